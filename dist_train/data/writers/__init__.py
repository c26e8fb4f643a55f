"""The torch-free writers of dtrain HDF5 files: ``dtrain data synth`` and ``dtrain data convert``.

* :mod:`.synth`: demo datasets with learnable structure (``wch5``, ``wch5_channels_last``, ``image``;
  ``hits`` through :mod:`.synth_hits`);
* :mod:`.synth_hits`: a demo hit-list file and its detector geometry;
* :mod:`.convert`: npz/npy, MNIST IDX and ImageFolder sources → a dtrain HDF5 file, bounded memory;
* :mod:`.convert_hits`: a hit-list file → contiguous samples (mPMT images or point clouds);
* :mod:`.progress`: the one progress bar they all show.

They read with :mod:`dist_train.data` (``convert_hits`` builds samples with the training reader) and
nothing in :mod:`dist_train.data` imports them. Every file they write is published with
:func:`dist_train.fsutil.atomic_replace`: a failed or interrupted write leaves the previous file (or
none) and no temporary file.
"""

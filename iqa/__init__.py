"""The library under the entry scripts (train_swin.py, train_clip.py, cross_dataset_test.py, ...).

Nothing in this package imports an entry script; the entry scripts import from here.
"""

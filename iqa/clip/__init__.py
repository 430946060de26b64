"""The CLIP system (train_clip.py): models (CLIP towers + quality and consistency heads), data
(prompt CSVs, the split by prompt, CLIP pixels, the demo set) and evaluation (scoring shared by
training and cross_dataset_test.py, the checkpoint format)."""

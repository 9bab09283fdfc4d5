"""Files of rows in and out: readers (.npy, .npz, .csv, .jsonl, .parquet, text), writers
of ordered results, and ``inferq score``'s pipeline from one to the other."""

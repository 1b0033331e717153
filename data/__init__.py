"""Stand-alone data tools: train_tokenizer.py, create_tfrecords.py, prepare_demo.py."""

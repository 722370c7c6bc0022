"""The KFP component definitions (ingest, train, evaluate, report): typed wrappers over ``pneumonia_kfp``."""

"""Pipeline steps (ingest, train, evaluate, report): plain-Python cores plus thin KFP wrappers."""

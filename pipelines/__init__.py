"""The KFP pipeline, its platform settings and the ``pneumonia-kfp`` CLI."""

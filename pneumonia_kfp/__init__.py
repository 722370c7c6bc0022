"""pneumonia-kfp's library: the plain-Python core of every pipeline step. It never imports kfp."""
__version__ = "0.1.0"

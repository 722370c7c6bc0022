"""Image-size limits, a leaf module (it imports nothing of the project) that params, backbones and
validation can all read without importing each other."""

MIN_IMAGE_SIZE = 32  # px a side: CNN backbones downsample 32x, smaller inputs vanish before the head
MAX_IMAGE_SIZE = 1024  # px a side: a 224 px Kermany set is 0.3 GB of uint8 tensors; 1024 px would be 6 GB

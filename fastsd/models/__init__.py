"""The SD1.x models, one readable file each (clip.py, vae.py, unet.py; layers.py: the blocks they share), with
module names that mirror the LDM checkpoint keys."""

"""What differs between teachers: the families (`families`: SD 1.x/2.x, SDXL, PixArt, SD3) and a loaded teacher's
parts (`parts`)."""

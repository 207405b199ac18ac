"""The model layer: the U-Net with h access, the diffusion process, sampling, the latent codec,
data, editing directions, seeds, pictures and the paper tier's released assets."""

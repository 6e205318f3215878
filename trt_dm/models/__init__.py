"""Loading diffusion models: diffusers UNet and pipeline directories, the embedded models, text pipelines, random-weight builders, the diffusers drop-in."""

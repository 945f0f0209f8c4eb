"""Backbones F_theta(x_in, c_noise(t), c_noise(s), class_labels) for CTM.

Both follow one interface: forward(x_in, noise_t, noise_s, class_labels=None) returns a
tensor of x_in's shape and dtype, last_layer_weight() returns the output layer's weight, and
compile_trunk() compiles all but that layer; compile_options() gives torch.compile's arguments
for any backbone compile (networks.trunk).
EDM scalings (c_in, c_skip, c_out) live in the CTMModel wrapper, not here.
"""

from .embeddings import PositionalEmbedding, TimeEmbedding, count_parameters
from .mlp import MLPBackbone
from .trunk import compile_options
from .unet import UNetBackbone

__all__ = ["MLPBackbone", "UNetBackbone", "compile_options", "count_parameters", "PositionalEmbedding", "TimeEmbedding"]

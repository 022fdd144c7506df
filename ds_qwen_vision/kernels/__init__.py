"""Custom and fused kernels, each in one file with its CPU reference path."""

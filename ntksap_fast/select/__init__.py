"""Selection: the masked top-k, the global/floored selection and the density schedule."""

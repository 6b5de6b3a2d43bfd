"""The R1 pipeline's data stages: rejection sampling (``sample``) and the stages that chain them."""

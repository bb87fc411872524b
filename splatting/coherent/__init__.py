"""CoherentGS (Paliwal et al., ECCV 2024): sparse-view Gaussian splatting with one Gaussian per input
pixel, coherent depth (implicit decoders, depth layers, disparity TV, optical-flow loss) and no
densification. Written from the paper; see model.py, depth.py, flow.py and train.py."""

"""TorchRec's reference DLRM trainer (facebookresearch/dlrm torchrec_dlrm) as a CAFE client."""

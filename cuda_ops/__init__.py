"""CUDA sources of the WKV-7 kernel (data, not code): installed as `vrwkv_core.cuda_ops`, built by
`vrwkv_core.kernels.wkv7.cuda` with torch cpp_extension + ninja on first use."""

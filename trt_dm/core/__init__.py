"""The project's shared vocabulary, importing nothing else of trt_dm: the input signature and dtypes, the noise
schedule and sampler rules, guidance, range sets, export reports and engine sidecars, TensorRT flavours, atomic
writes, images, stage costs, the CPU's int8 instructions and typed input errors."""

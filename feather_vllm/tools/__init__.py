"""Tools around the plugin, outside its import path: evaluation
(`python -m feather_vllm.tools.evaluate`), kept-token analysis
(`python -m feather_vllm.tools.analyze`), random-weight checkpoints
(`feather_vllm.tools.checkpoints`) and the demo model's scenes and training
(`feather_vllm.tools.demo`).

They need the `tools` extra (`pip install "feather-vllm[tools]"`: matplotlib,
tqdm). The plugin (`feather_vllm`, loaded by vLLM) never imports this package.
The demo's shipped weights are package data in `feather_vllm/demo/`.
"""

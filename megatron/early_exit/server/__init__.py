"""REST generation server: Megatron-compatible `PUT /api`, OpenAI-compatible
`POST /v1/completions`, health and Prometheus metrics, rank coordination.

Launch: `torchrun ... tools/run_text_generation_server.py --load CKPT`.
"""

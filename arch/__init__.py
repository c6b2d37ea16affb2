"""The two model families (qwen3_vl_moe.py, kimi_vl.py), the blocks they share (blocks.py) and checkpoint reading
(checkpoint.py). model.py, at the top, is their entry point."""

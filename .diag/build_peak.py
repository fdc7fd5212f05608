import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.getcwd())
from transformers import LlamaConfig
from ftcluster import config as C, engine, models
from ftcluster.presets import PRESETS
from tests import tiny
import tempfile, pathlib
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29571", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
d = pathlib.Path(tempfile.mkdtemp()); tm = tiny.build(d)
LlamaConfig(**PRESETS["llama-3-8b"]).save_pretrained(d / "shape")
cfg = C.load(None, [f"model.name_or_path={d/'shape'}", f"model.tokenizer={tm}", "method=lora", "model.random_init=true",
                    "model.attn_implementation=sdpa", "deepspeed.zero_stage=3", "deepspeed.offload_param=cpu"])
dev = torch.device("cuda", 0); torch.cuda.set_device(dev); dist.init_process_group("nccl", rank=0, world_size=1)
part = engine.zero3_partition(cfg, 1)
orig = type(part).__call__
n = [0]
def traced(self, params):
    before = torch.cuda.memory_allocated(dev)
    orig(self, params)
    n[0] += 1
    if n[0] <= 14 or n[0] % 50 == 0:
        print(f"call {n[0]}: {[tuple(p.ds_shape) for p in params]} before {before/1e9:.3f} after {torch.cuda.memory_allocated(dev)/1e9:.3f} max {torch.cuda.max_memory_allocated(dev)/1e9:.3f} GB", flush=True)
type(part).__call__ = traced
torch.cuda.reset_peak_memory_stats(dev)
m = models.build_base_model(cfg, dev, part)
print("after base build", torch.cuda.memory_allocated(dev)/1e9, torch.cuda.max_memory_allocated(dev)/1e9)
torch.cuda.memory._record_memory_history(max_entries=100000)

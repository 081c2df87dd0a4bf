import time, torch
from catdog.models import load_checkpoint
from catdog.data import load_split, CachedImages, make_loader
from catdog.transforms import eval_preset
from catdog.engine import predict_logits, evaluate
from catdog.device import resolve_runtime
def test_pipe(pipeline):
    p = pipeline.paths
    m, c = load_checkpoint(p.checkpoint)
    for s in ("train", "val", "test"):
        sp = load_split(p, s)
        l = make_loader(CachedImages(p, sp, eval_preset(64)), 16, 0)
        lo, t = predict_logits(m, l, resolve_runtime(), "x")
        print(s, (lo.argmax(1) == t).float().mean(), torch.softmax(lo,1)[:,1], t)

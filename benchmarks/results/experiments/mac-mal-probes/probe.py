"""Probe MAC / MAL changes with the harness (monkeypatches, then train + evaluate)."""
import json, sys, time
import torch
torch.set_num_threads(1)
from titans_layers.models import mixers, mac
from titans_layers.models.mixers import _prefix
from titans_layers.experiments.models import build_model
from titans_layers.experiments.tasks import MQAR
from titans_layers.experiments.training import TrainConfig, train
from titans_layers.experiments.evaluation import evaluate_mqar

model_name, patch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}

if patch == "mal_res":
    def fwd(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, output_attentions=False, **kw):
        m, _, _ = self.memory(hidden_states)
        y, _, _ = self.attention(hidden_states + m, prefix_states=_prefix(self.persistent))
        return m + y, None, None
    mixers.MALMixer.forward = fwd
if patch == "mal_in":  # attention over x + m, no direct memory path
    def fwd(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, output_attentions=False, **kw):
        m, _, _ = self.memory(hidden_states)
        y, _, _ = self.attention(hidden_states + m, prefix_states=_prefix(self.persistent))
        return y, None, None
    mixers.MALMixer.forward = fwd
if patch.startswith("mac_"):
    from titans_layers.models.mac import LayerStates
    mode = patch[4:]
    def whole(self, x):
        B, T, D = x.shape
        S = self.segment_size
        q = self.memory.query(x)[0]
        states = LayerStates()
        outs = []
        for s0 in range(0, T, S):
            xs = x[:, s0:s0 + S]
            entry = states[self.memory.layer_idx]
            weights = self.memory.memory_weights(entry["recurrent_state"] if entry is not None else None)
            h = self.memory.retrieve(q[:, s0:s0 + S], xs, weights)
            prefix, positions = self._prefix(h)
            y, _, _ = self.attention(xs, prefix_states=prefix, prefix_positions=positions)
            w = y + xs if "write" in mode else y
            m, _, _ = self.memory(w, past_key_values=states, use_cache=True)
            o = self.gate(y, m)
            if "addh" in mode:
                o = o + h
            if "addm" in mode:
                o = o + m
            outs.append(o)
        return torch.cat(outs, dim=1)
    mac.MACMixer._forward_whole = whole

task = MQAR(seq_len=128, num_kv_pairs=8, vocab_size=64)
width = opts.pop("hidden_size", 56 if model_name != "lmm" else 64)
lr = opts.pop("lr", 3e-3)
built = build_model(model_name, 64, 128, opts, hidden_size=width, seed=0)
t0 = time.time()
res = train(built.model, task, TrainConfig(steps=steps, batch_size=32, lr=lr, eval_every=0), torch.device("cpu"), progress=False)
m = evaluate_mqar(built.model, task, torch.device("cpu"), 0, num_examples=128, loads=[4, 8, 16])
print(json.dumps({"model": model_name, "patch": patch, "opts": opts, "lr": lr, "params": built.params, "steps": steps,
                  "acc": m["accuracy"], "by_dist": {k: v["accuracy"] for k, v in m["accuracy_by_distance"].items()},
                  "by_load": m["accuracy_by_load"], "train_s": time.time() - t0}))

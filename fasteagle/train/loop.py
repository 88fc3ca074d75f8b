"""The EAGLE training loop for an EAGLE-1/2 draft head.

For a sequence x[0..N) with target features f[0..N-1) (f[t] = final-normed last hidden state at token t):

    out[t] = head(f[t] + noise, x[t+1])        (causal over t, like the head at inference)
    loss   = smooth_l1(out[t], f[t+1])  +  ce_weight * CE(softmax(W f[t+1]), log_softmax(W out[t]))

averaged over the answer positions (f[t+1] belongs to the prompt's last token or to the answer: what the head
must predict at inference), W = the target's frozen LM head. Uniform noise U(-noise/2, noise/2) on the input
features, as in the EAGLE reference, makes the head robust to its own (imperfect) features when it drafts deeper.
ttt_steps = k > 1 goes further (training-time test, HASS / EAGLE-3): the loss also covers steps 2..k, where the
head's input is its own previous prediction and its attention sees what it would see k levels deep in the tree.

The soft CE costs two LM-head products per token (the head itself is ~4M parameters; SmolLM2's LM head is 28M):
with ce_vocab="data" both are restricted to the token ids that occur in the training data (W's rows for those ids
only, a documented approximation; the data's labels are all inside it), ce_vocab="full" uses every row.
Validation accuracy always uses the full vocabulary: argmax of the LM head over the head's output == the target's
greedy next token x[t+2].

The head is trained with its own cache-free forward (`train_forward`: the same submodules as DraftHead.forward,
plain causal SDPA) so autograd never meets the static KV cache's in-place writes.
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fasteagle.draft import DraftHead, load_draft, save_draft
from fasteagle.errors import FastEagleError
from fasteagle.model import ModelArgs, apply_rope, rope_cache
from fasteagle.train.data import load_dataset, read_manifest

STATE = "state.pt"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    steps: int = 2000
    lr: float = 5e-4
    warmup: int = 100
    batch_tokens: int = 4096  # padded tokens (rows x longest row) per optimizer step
    max_len: int = 1024  # longest training sequence in (feature, token) pairs; older context is cut
    val_frac: float = 0.05
    max_val_seqs: int = 64  # validation sequences actually scored (full-vocabulary LM head: not free on CPU)
    ckpt_every: int = 200
    eval_every: int = 500
    noise: float = 0.2  # width of the uniform input-feature noise
    ce_weight: float = 0.1
    ce_vocab: str = "data"  # "data" | "full"
    seed: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 0.5  # clip gradient values (the reference's clip_grad_value_ 0.5); 0 = off
    betas: tuple = (0.9, 0.95)
    loss_positions: str = "answer"  # "answer": the self-distilled answers only; "all": every position (prompts too)
    save_dtype: str = "float32"  # dtype of the written head's weights (float16 halves the file; loads into any dtype)
    ttt_steps: int = 1  # drafting steps simulated in training (1 = the EAGLE objective; see train_forward)


def new_head(target, seed: int = 0) -> DraftHead:
    """A freshly initialised EAGLE-1/2 head for `target` (one decoder layer of the target's shape), bound to it."""
    torch.manual_seed(seed)
    args = ModelArgs.from_dict({**target.args.to_dict(), "n_layers": 1})
    dev = target.embed.weight.device
    return DraftHead(args, fc_bias=True).to(dev).bind(target)


def train_forward(head: DraftHead, tokens, features, rope, steps: int = 1) -> list:
    """Cache-free DraftHead.forward over whole sequences: tokens [B, T], features [B, T, dim] -> [out [B, T, dim]]
    per drafting step. rope: rope_cache(head.args, >= T) on the head's device. Position t of every row is t.

    Pair t = (feature of token t, token t+1); the head's output at pair t predicts the feature of token t+1.
    Step 1 is the head on the target's features, as in the plain EAGLE objective. Step k > 1 simulates drafting
    k levels deep (training-time test, as in HASS / EAGLE-3): pair t's feature is the head's own step k-1
    prediction from pair t-1, and pair t attends to what it would see in the tree at depth k: the step-1 keys of
    pairs 0..t-k+1 (the accepted context, real features) and the step-i keys of pair t-k+i for i = 2..k (its
    drafted ancestors and itself). Row t < k-1 of step k has no such past and is meaningless (masked by the loss)."""
    B, T = tokens.shape
    layer = head.layers[0]
    attn = layer.attn
    rep = attn.n_heads // attn.n_kv_heads
    cos_sin = rope[:T][None].expand(B, T, *rope.shape[1:])
    emb = F.embedding(tokens, head.embed_weight)
    outs, keys, values = [], [], []
    t = torch.arange(T, device=tokens.device)
    for k in range(1, steps + 1):
        if k > 1:  # pair t takes the prediction made at pair t-1; row 0 gets a zero feature (masked)
            features = F.pad(outs[-1][:, :-1], (0, 0, 1, 0))
        x = head.fc(torch.cat([emb, features.to(head.fc.weight.dtype)], -1))
        h = layer.attn_norm(x)
        q = attn.wq(h).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
        kk = attn.wk(h).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.wv(h).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        q, kk = apply_rope(q, cos_sin), apply_rope(kk, cos_sin)
        if rep > 1:  # repeat K/V heads (enable_gqa is not in every torch this runs on)
            kk, v = kk.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        keys.append(kk)
        values.append(v)
        if k == 1:
            o = F.scaled_dot_product_attention(q, kk, v, is_causal=True)
        else:  # [T, k*T] mask over the keys of steps 1..k
            blocks = [t[None, :] <= t[:, None] - k + 1] + [t[None, :] == t[:, None] - k + i for i in range(2, k + 1)]
            o = F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2),
                                               attn_mask=torch.cat(blocks, 1))
        x = x + attn.wo(o.transpose(1, 2).reshape(B, T, -1))
        outs.append(x + layer.mlp(layer.mlp_norm(x)))
    return outs


# --- batches ---------------------------------------------------------------------------------------------------------


def _pairs(seq, max_len):
    """(start, n): the sequence's (feature, next token) pairs, the last max_len of them."""
    n = len(seq.tokens) - 1
    return max(0, n - max_len), min(n, max_len)


def collate(seqs, max_len, device, all_positions: bool = False):
    """Pad a list of Sequences into training tensors:
    tokens [B, T] (x[t+1]), feats [B, T, dim] (f[t]), target [B, T, dim] (f[t+1]), labels [B, T] (x[t+2]),
    mask [B, T] (answer positions with a target)."""
    spans = [_pairs(s, max_len) for s in seqs]
    T = max(n for _, n in spans)
    dim = seqs[0].features.shape[1]
    B = len(seqs)
    tokens = torch.zeros(B, T, dtype=torch.long)
    labels = torch.zeros(B, T, dtype=torch.long)
    feats = torch.zeros(B, T + 1, dim, dtype=torch.float16)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (s, (start, n)) in enumerate(zip(seqs, spans)):
        N = len(s.tokens)
        tokens[b, :n] = s.tokens[start + 1 : start + 1 + n]
        labels[b, : n - 1] = s.tokens[start + 2 : start + 1 + n]
        feats[b, :n] = s.features[start : start + n]  # f[N-1] does not exist: feats[b, n] stays 0
        t = torch.arange(n) + start  # global position of each pair
        mask[b, :n] = ((t >= s.prompt_len - 2) | all_positions) & (t <= N - 3)
    feats = feats.to(device=device, dtype=torch.float32)
    return tokens.to(device), feats[:, :-1], feats[:, 1:], labels.to(device), mask.to(device)


def epoch_batches(lengths: list[int], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffle, then group sequences of similar length (within windows of 64) into batches of <= batch_tokens
    padded tokens; the batch order is shuffled again. Deterministic in (seed, epoch), so a resumed run continues
    the same order."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    batches = []
    for w in range(0, len(order), 64):
        window = sorted(order[w : w + 64], key=lambda i: -lengths[i])
        cur, longest = [], 0
        for i in window:
            if cur and max(longest, lengths[i]) * (len(cur) + 1) > batch_tokens:
                batches.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, lengths[i])
        if cur:
            batches.append(cur)
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


# --- loss and validation ---------------------------------------------------------------------------------------------


def head_loss(head, batch, rope, lm_w, cfg: TrainConfig, noise: bool):
    """Returns (loss, vloss, ploss, n positions, correct top-1 over lm_w's rows vs the target's argmax), the last
    four for step 1. With cfg.ttt_steps > 1 the loss adds step k's (weighted 0.8^(k-1)) at the positions it has."""
    tokens, feats, target, _, mask = batch
    if noise and cfg.noise > 0:
        feats = feats + (torch.rand_like(feats) - 0.5) * cfg.noise
    outs = train_forward(head, tokens, feats, rope, cfg.ttt_steps)
    loss = 0.0
    for k, out in enumerate(outs, 1):
        m = mask.clone()
        m[:, : k - 1] = False
        pred, tgt = out[m].float(), target[m]  # [M, dim]: only answer positions pay for the LM head
        vloss_k = F.smooth_l1_loss(pred, tgt)
        with torch.no_grad():
            tgt_logits = tgt @ lm_w.t()
            p = torch.softmax(tgt_logits, -1)
        logits = (pred @ lm_w.t()).float()
        ploss_k = -(p * torch.log_softmax(logits, -1)).sum(-1).mean()
        loss = loss + 0.8 ** (k - 1) * (vloss_k + cfg.ce_weight * ploss_k)
        if k == 1:
            vloss, ploss, n = vloss_k, ploss_k, pred.shape[0]
            correct = (logits.argmax(-1) == tgt_logits.argmax(-1)).sum()
    return loss, vloss, ploss, n, correct


@torch.no_grad()
def validate(head, seqs, rope, cfg: TrainConfig, batch_tokens: int | None = None) -> dict:
    """Top-1 accuracy of the head's next-token guess (full vocabulary) against the target's greedy token, plus
    the regression loss, over the answer positions of `seqs` (no input noise): always the self-distilled answers,
    what the head meets at inference, whatever positions it was trained on. acc2: the same one level deeper, on
    the head's own predicted feature (step 2 of train_forward), which is what drafting depth 2 and beyond needs."""
    if not seqs:
        return {"acc": None, "acc2": None, "vloss": None, "n": 0}
    dev = head.fc.weight.device
    was_training = head.training
    head.eval()
    lengths = [_pairs(s, cfg.max_len)[1] for s in seqs]
    correct = correct2 = n = n2 = 0
    vsum = 0.0
    for idx in epoch_batches(lengths, batch_tokens or cfg.batch_tokens, 0, 0):
        tokens, feats, target, labels, mask = collate([seqs[i] for i in idx], cfg.max_len, dev)
        with _autocast(dev):
            out, out2 = train_forward(head, tokens, feats, rope, steps=2)
        pred = out[mask].float()
        vsum += F.smooth_l1_loss(pred, target[mask], reduction="sum").item() / pred.shape[-1]
        correct += int((head.logits(pred.to(head.lm_head_weight.dtype)).argmax(-1) == labels[mask]).sum())
        n += pred.shape[0]
        mask[:, 0] = False
        pred2 = out2[mask].to(head.lm_head_weight.dtype)
        correct2 += int((head.logits(pred2).argmax(-1) == labels[mask]).sum())
        n2 += pred2.shape[0]
    head.train(was_training)
    return {"acc": correct / n if n else None, "acc2": correct2 / n2 if n2 else None,
            "vloss": vsum / n if n else None, "n": n}


def _autocast(dev):
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


# --- the loop --------------------------------------------------------------------------------------------------------


def _lr_lambda(cfg: TrainConfig):
    def f(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def split(seqs, cfg: TrainConfig):
    """Held-out validation sequences (a seeded random val_frac of those with answers) and the rest for training
    (with loss_positions="all", answer-less sequences too)."""
    answered = [i for i, s in enumerate(seqs) if len(s.tokens) - s.prompt_len >= 2]  # an answer with a target
    if len(answered) < 2:
        raise FastEagleError(f"need at least 2 sequences with answers to train, found {len(answered)}")
    g = torch.Generator().manual_seed(cfg.seed)
    perm = [answered[i] for i in torch.randperm(len(answered), generator=g).tolist()]
    n_val = min(len(perm) - 1, max(1, round(cfg.val_frac * len(perm)))) if cfg.val_frac > 0 else 0
    val = set(perm[:n_val])
    if cfg.loss_positions == "all":
        train = [s for i, s in enumerate(seqs) if i not in val and len(s.tokens) >= 3]
    else:
        train = [seqs[i] for i in perm[n_val:]]
    return train, [seqs[i] for i in perm[:n_val]]


def _val_line(v):
    if v["acc"] is None:
        return f"step {v['step']}: no validation positions"
    return (f"step {v['step']}: val top-1 acc {v['acc']:.4f} (depth 2: {v['acc2']:.4f}), smooth-L1 {v['vloss']:.4f} "
            f"({v['n']} positions)")


def _ema(old, new, keep=0.95):
    return new if old is None else keep * old + (1 - keep) * new


def _save_atomic(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fit(target, data_dir, out_dir, cfg: TrainConfig, *, resume: bool = False, state_dir=None, source=None,
        stop_at: int | None = None, init=None, progress: bool = True) -> dict | None:
    """Train a draft head on DATA_DIR and write it (the best validation accuracy seen) to out_dir with save_draft.
    The training state goes to state_dir (default out_dir + '.state') every cfg.ckpt_every steps; resume=True
    continues from it. stop_at: save the state and return None once this many steps are done (split a long run
    over several sessions). init: a draft head directory to start from instead of random weights (fine-tune a
    head on new data; the optimizer and schedule start afresh). Returns the training summary (also stored in the
    head's config.json as "training")."""
    if cfg.steps < 1 or cfg.lr <= 0 or cfg.batch_tokens < 1 or cfg.max_len < 2 or cfg.ttt_steps < 1:
        raise FastEagleError("steps, lr, batch-tokens, ttt-steps must be positive and max-len >= 2")
    if cfg.save_dtype not in _DTYPES:
        raise FastEagleError(f"unknown save dtype {cfg.save_dtype!r} ({', '.join(_DTYPES)})")
    if cfg.loss_positions not in ("answer", "all"):
        raise FastEagleError(f"unknown loss positions {cfg.loss_positions!r} (answer or all)")
    if cfg.ce_vocab not in ("data", "full"):
        raise FastEagleError(f"unknown --ce-vocab {cfg.ce_vocab!r} (data or full)")
    out_dir = Path(out_dir)
    state_dir = Path(state_dir) if state_dir else out_dir.with_name(out_dir.name + ".state")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FastEagleError(f"{out_dir}: output directory exists and is not empty")
    state_path = state_dir / STATE
    if state_path.exists() and not resume:
        raise FastEagleError(f"{state_path}: a training state exists; pass --resume to continue it or remove it")
    if resume and not state_path.exists():
        raise FastEagleError(f"--resume: no training state at {state_path}")
    dev = target.embed.weight.device
    data_dirs = [str(d) for d in data_dir] if isinstance(data_dir, (list, tuple)) else [str(data_dir)]
    seqs = load_dataset(data_dirs, dim=target.args.dim)
    data_id = {"dirs": data_dirs, "settings": [read_manifest(d)["settings"] for d in data_dirs],
               "sequences": len(seqs)}
    train, val = split(seqs, cfg)
    val = val[: cfg.max_val_seqs]
    lengths = [_pairs(s, cfg.max_len)[1] for s in train]
    n_answer = sum(len(s.tokens) - s.prompt_len for s in train)

    head = new_head(target, cfg.seed).train()  # fp32 weights whatever the target's dtype (autocast on GPU)
    if init is not None and not resume:
        start = load_draft(init, target, device=dev)
        if start.args != head.args or (start.fc.bias is None) != (head.fc.bias is None):
            raise FastEagleError(f"--init {init}: not an EAGLE-1/2 head of this shape")
        head.load_state_dict(start.state_dict())
    if cfg.ce_vocab == "data":  # the ids of the self-distilled sequences (prompt-only text would only widen it)
        ids = torch.unique(torch.cat([s.tokens for s in train if len(s.tokens) > s.prompt_len] or
                                     [s.tokens for s in train]))
        lm_w = target.lm_head_weight().detach()[ids.to(dev)].float()
    else:
        lm_w = target.lm_head_weight().detach().float()
    rope = rope_cache(head.args, cfg.max_len + 1).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    step, epoch, batch_pos, history, best = 0, 0, 0, [], None
    if resume:
        st = torch.load(state_path, map_location=dev, weights_only=False)
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        sched.lr_lambdas[0] = _lr_lambda(cfg)  # --steps may have changed: the schedule follows the new total
        step, epoch, batch_pos, history, best = st["step"], st["epoch"], st["batch_pos"], st["history"], st["best"]
        torch.set_rng_state(st["rng"])
        if st["data"] != data_id:
            raise FastEagleError(f"--resume: the data ({', '.join(data_dirs)}: {len(seqs)} sequences) is not what "
                                 f"this state was trained on ({st['data']['sequences']} sequences)")

    def save_state():
        state_dir.mkdir(parents=True, exist_ok=True)
        _save_atomic({"head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                      "epoch": epoch, "batch_pos": batch_pos, "history": history, "best": best,
                      "rng": torch.get_rng_state(), "config": asdict(cfg),
                      "data": data_id}, state_path)

    def run_validation():
        nonlocal best
        v = validate(head, val, rope, cfg)
        v.update(step=step, time=time.time())
        history.append(v)
        if v["acc"] is not None and (best is None or v["acc"] >= best["acc"]):
            best = {"acc": v["acc"], "step": step, "head": {k: t.detach().cpu().clone() for k, t in head.state_dict().items()}}
        return v

    bar = tqdm(total=cfg.steps, initial=step, unit="step", desc="fit", disable=not progress, dynamic_ncols=True)
    run_loss = run_acc = None
    n_batches = 1
    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    while step < end:
        batches = epoch_batches(lengths, cfg.batch_tokens, cfg.seed, epoch)
        n_batches = len(batches)
        while batch_pos < len(batches) and step < end:
            batch = collate([train[i] for i in batches[batch_pos]], cfg.max_len, dev, cfg.loss_positions == "all")
            batch_pos += 1
            if not bool(batch[4].any()):
                continue
            with _autocast(dev):
                loss, vloss, ploss, n, correct = head_loss(head, batch, rope, lm_w, cfg, noise=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_value_(head.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            run_loss, run_acc = _ema(run_loss, loss.item()), _ema(run_acc, int(correct) / max(1, n))
            bar.update(1)
            bar.set_postfix(loss=f"{run_loss:.3f}", v=f"{vloss.item():.3f}", p=f"{ploss.item():.2f}",
                            acc=f"{run_acc:.3f}", ep=epoch, lr=f"{sched.get_last_lr()[0]:.1e}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                v = run_validation()
                bar.write(_val_line(v))
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                save_state()
        if batch_pos >= len(batches):
            epoch, batch_pos = epoch + 1, 0
    bar.close()
    if step < cfg.steps:  # stopped early on request
        save_state()
        print(f"stopped at step {step}; state saved to {state_path} (continue with --resume)")
        return None
    if not history or history[-1]["step"] != step:
        v = run_validation()
        print(_val_line(v))
    save_state()
    if best is not None:
        head.load_state_dict(best["head"])
    summary = {
        "steps": step, "epochs": round(epoch + batch_pos / max(1, n_batches), 2),
        "best_step": best["step"] if best else step, "val_acc": best["acc"] if best else None,
        "val_history": [{k: h.get(k) for k in ("step", "acc", "acc2", "vloss", "n")} for h in history],
        "train_sequences": len(train), "train_answer_tokens": n_answer,
        "train_tokens": sum(len(s.tokens) for s in train), "val_sequences": len(val),
        "ce_vocab_size": int(lm_w.shape[0]), "config": asdict(cfg), "device": str(dev),
        "data": data_dirs, **({"init": str(init)} if init is not None else {}), **({"source": source} if source else {}),
    }
    save_draft(head.to(_DTYPES[cfg.save_dtype]), out_dir, extra={"training": summary})
    head.float()
    acc = "n/a" if summary["val_acc"] is None else f"{summary['val_acc']:.4f}"
    print(f"{out_dir}: head from step {summary['best_step']} (val top-1 acc {acc})")
    return summary

"""The EAGLE training loop for an EAGLE-1/2 or EAGLE-3 draft head.

For a sequence x[0..N) with target features f[0..N-1) (f[t] = final-normed last hidden state at token t):

    out[t] = head(f[t] + noise, x[t+1])        (causal over t, like the head at inference)
    loss   = smooth_l1(out[t], f[t+1])  +  ce_weight * CE(softmax(W f[t+1]), log_softmax(W out[t]))

averaged over the answer positions (f[t+1] belongs to the prompt's last token or to the answer: what the head
must predict at inference), W = the target's frozen LM head. Uniform noise U(-noise/2, noise/2) on the input
features, as in the EAGLE reference, makes the head robust to its own (imperfect) features when it drafts deeper.
ttt_steps = k > 1 goes further (training-time test, HASS / EAGLE-3): the loss also covers steps 2..k, where the
head's input is its own previous prediction and its attention sees what it would see k levels deep in the tree.

EAGLE-3 (arch="eagle3", on data generated with taps): the head reads fc(the tapped layers' inputs at token t) and
predicts token t+2 over its own draft vocabulary (the draft_vocab_size most frequent answer tokens); the loss is
the soft CE against the target's distribution restricted to that vocabulary, at positions whose target token is in
it, summed over ttt_steps steps (0.8^(k-1)), as in the reference; no feature regression (eagle3_loss).

The soft CE costs two LM-head products per token (the head itself is ~4M parameters; SmolLM2's LM head is 28M):
with ce_vocab="data" both are restricted to the token ids that occur in the training data (W's rows for those ids
only, a documented approximation; the data's labels are all inside it), ce_vocab="full" uses every row.
Validation accuracy always uses the full vocabulary: argmax of the LM head over the head's output == the target's
greedy next token x[t+2].

The head is trained through its own decoder layer (`forward.train_forward`: the layer as at inference, its KV cache
swapped for per-step keys), so autograd never meets the static KV cache's in-place writes.
"""
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fasteagle.draft import DraftHead, load_draft, save_draft
from fasteagle.eagle3 import Eagle3Head
from fasteagle.errors import FastEagleError
from fasteagle.model import rope_cache
from fasteagle.train.forward import train_forward
from fasteagle.train.data import data_taps, load_dataset, read_manifest
from fasteagle.train.vocab import counts_from_sequences, draft_vocab

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
    arch: str = "eagle"  # "eagle" (EAGLE-1/2) | "eagle3" (needs data generated with taps)
    draft_vocab_size: int = 16384  # EAGLE-3: the head's own vocabulary, the most frequent tokens of the answers


def new_head(target, seed: int = 0) -> DraftHead:
    """A freshly initialised EAGLE-1/2 head for `target` (one decoder layer of the target's shape), bound to it."""
    torch.manual_seed(seed)
    args = target.args.draft_layer()
    dev = target.embed.weight.device
    return DraftHead(args, fc_bias=True).to(dev).bind(target)


def new_eagle3_head(target, taps, vocab: torch.Tensor, seed: int = 0) -> Eagle3Head:
    """A freshly initialised EAGLE-3 head for `target` reading layers `taps`, over the draft vocabulary `vocab`
    (target ids), bound to it. Its LM head and final norm start as the target's (those rows of its LM head): the
    head then starts out predicting what the target would from the head's output."""
    torch.manual_seed(seed)
    args = target.args.draft_layer()
    head = Eagle3Head(args, len(vocab), taps)
    with torch.no_grad():
        head.draft_vocab.copy_(vocab)
        head.lm_head.weight.copy_(target.lm_head_weight().detach()[vocab.to(target.embed.weight.device)].float())
        head.norm.weight.copy_(target.norm.weight.detach().float())
    return head.to(target.embed.weight.device).bind(target)


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


def split_batch(head, batch):
    """EAGLE-3 data carries the final-normed hidden state after the tapped streams: the head reads the streams,
    the loss the hidden state. Returns (tokens, input features, target hidden state of token t+1, labels, mask)."""
    if head.arch != "eagle3":
        return batch
    tokens, feats, target, labels, mask = batch
    dim = head.args.dim
    return tokens, feats[..., :-dim], target[..., -dim:], labels, mask


def _noisy(feats, cfg: TrainConfig, noise: bool):
    return feats + (torch.rand_like(feats) - 0.5) * cfg.noise if noise and cfg.noise > 0 else feats


def head_loss(head, batch, rope, lm_w, cfg: TrainConfig, noise: bool):
    """EAGLE-1/2. Returns (loss, vloss, ploss, n positions, correct top-1 over lm_w's rows vs the target's argmax),
    the last four for step 1. With cfg.ttt_steps > 1 the loss adds step k's (weighted 0.8^(k-1)) at the positions
    it has."""
    tokens, feats, target, _, mask = batch
    outs = train_forward(head, tokens, _noisy(feats, cfg, noise), rope, cfg.ttt_steps)
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


def eagle3_loss(head, batch, rope, lm_w, in_vocab, cfg: TrainConfig, noise: bool):
    """EAGLE-3 (the reference's objective): soft cross-entropy of the head's draft-vocabulary distribution against
    the target's, restricted to the draft vocabulary (lm_w: those rows of the target's LM head) and renormalised
    there, at the positions whose target token (the label: the target's greedy choice at answer positions) is
    in the draft vocabulary (in_vocab: [vocab_size] bool). Steps k = 1..ttt_steps weigh 0.8^(k-1). Returns
    (loss, None, step-1 ploss, n positions, correct top-1 vs the target's restricted argmax)."""
    tokens, feats, target, labels, mask = batch
    outs = train_forward(head, tokens, _noisy(feats, cfg, noise), rope, cfg.ttt_steps)
    mask = mask & in_vocab[labels]
    with torch.no_grad():  # the target's distribution at the scored positions, once for every step
        p_all = torch.softmax(target[mask] @ lm_w.t(), -1)
    col = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)[mask]  # each scored position's column
    loss, ploss, n, correct = 0.0, None, 0, torch.zeros((), dtype=torch.long)
    for k, out in enumerate(outs, 1):
        m = mask.clone()
        m[:, : k - 1] = False  # step k has no output before column k - 1
        if not bool(m.any()):
            continue
        p = p_all[col >= k - 1]
        logits = head.logits(out[m])
        ploss_k = -(p * torch.log_softmax(logits, -1)).sum(-1).mean()
        loss = loss + 0.8 ** (k - 1) * ploss_k
        if k == 1:
            ploss, n = ploss_k, int(m.sum())
            correct = (logits.argmax(-1) == p.argmax(-1)).sum()
    return loss, None, ploss, n, correct


def _top1(head, out):
    """The head's greedy guesses (target ids) for its outputs out [m, dim]: over the full vocabulary for an
    EAGLE-1/2 head (the target's LM head), over its draft vocabulary for an EAGLE-3 head."""
    if head.arch == "eagle3":
        return head.vocab_ids[head.logits(out.float()).argmax(-1)]
    return head.logits(out.to(head.lm_head_weight.dtype)).argmax(-1)


@torch.no_grad()
def validate(head, seqs, rope, cfg: TrainConfig, batch_tokens: int | None = None) -> dict:
    """Top-1 accuracy of the head's next-token guess (full vocabulary; EAGLE-3: its draft vocabulary) against the
    target's greedy token, plus (EAGLE-1/2) the regression loss, over the answer positions of `seqs` (no input
    noise): always the self-distilled answers, what the head meets at inference, whatever positions it was trained
    on. acc2: the same one level deeper, on the head's own predicted feature (step 2 of train_forward), which is
    what drafting depth 2 and beyond needs."""
    if not seqs:
        return {"acc": None, "acc2": None, "vloss": None, "n": 0}
    dev = head.fc.weight.device
    was_training = head.training
    head.eval()
    lengths = [_pairs(s, cfg.max_len)[1] for s in seqs]
    correct = correct2 = n = n2 = 0
    vsum = 0.0
    for idx in epoch_batches(lengths, batch_tokens or cfg.batch_tokens, 0, 0):
        tokens, feats, target, labels, mask = split_batch(head, collate([seqs[i] for i in idx], cfg.max_len, dev))
        with _autocast(dev):
            out, out2 = train_forward(head, tokens, feats, rope, steps=2)
        pred = out[mask].float()
        if head.arch != "eagle3":  # EAGLE-3 outputs are not features of the target
            vsum += F.smooth_l1_loss(pred, target[mask], reduction="sum").item() / pred.shape[-1]
        correct += int((_top1(head, pred) == labels[mask]).sum())
        n += pred.shape[0]
        mask[:, 0] = False
        correct2 += int((_top1(head, out2[mask]) == labels[mask]).sum())
        n2 += int(mask.sum())
    head.train(was_training)
    vloss = vsum / n if n and head.arch != "eagle3" else None
    return {"acc": correct / n if n else None, "acc2": correct2 / n2 if n2 else None, "vloss": vloss, "n": n}


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
    vloss = "" if v["vloss"] is None else f", smooth-L1 {v['vloss']:.4f}"
    return f"step {v['step']}: val top-1 acc {v['acc']:.4f} (depth 2: {v['acc2']:.4f}){vloss} ({v['n']} positions)"


def _ema(old, new, keep=0.95):
    return new if old is None else keep * old + (1 - keep) * new


def _save_atomic(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _head_and_objective(target, train, data_dirs, cfg: TrainConfig, init):
    """A fresh head of cfg.arch for the data (from `init`'s weights when given) and its loss, a function
    (head, batch, rope, noise) -> head_loss's tuple, with the LM-head rows it scores over set up once."""
    dev = target.embed.weight.device
    taps = data_taps(data_dirs)
    if cfg.arch not in ("eagle", "eagle3"):
        raise FastEagleError(f"unknown head architecture {cfg.arch!r} (eagle or eagle3)")
    if (cfg.arch == "eagle3") != bool(taps):
        raise FastEagleError("EAGLE-3 heads train on data generated with --arch eagle3 (the target's tapped layers), "
                             f"EAGLE-1/2 heads on data without; this data {'taps layers ' + str(list(taps)) if taps else 'has no taps'}")
    if cfg.arch == "eagle3":
        counts = counts_from_sequences(train, target.args.vocab_size)
        eos = sorted({e for d in data_dirs for e in read_manifest(d)["settings"]["eos_ids"]})  # answers' ends
        vocab = draft_vocab(counts, cfg.draft_vocab_size, always=eos)
        head = new_eagle3_head(target, taps, vocab, cfg.seed)
    else:
        head = new_head(target, cfg.seed)  # fp32 weights whatever the target's dtype (autocast on GPU)
    if init is not None:
        start = load_draft(init, target, device=dev)
        if start.arch != head.arch or start.args != head.args or start.state_dict().keys() != head.state_dict().keys() \
                or any(a.shape != b.shape for a, b in zip(start.state_dict().values(), head.state_dict().values())):
            raise FastEagleError(f"--init {init}: not an {cfg.arch} head of this shape")
        head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in start.state_dict().items()})
    head.train()
    if cfg.arch == "eagle3":
        lm_w = target.lm_head_weight().detach()[head.draft_vocab].float()
        in_vocab = torch.zeros(target.args.vocab_size, dtype=torch.bool, device=dev)
        in_vocab[head.draft_vocab] = True

        def loss_fn(head, batch, rope, noise):
            return eagle3_loss(head, batch, rope, lm_w, in_vocab, cfg, noise)
    else:
        if cfg.ce_vocab == "data":  # the ids of the self-distilled sequences (prompt-only text would only widen it)
            ids = torch.unique(torch.cat([s.tokens for s in train if len(s.tokens) > s.prompt_len] or
                                         [s.tokens for s in train]))
            lm_w = target.lm_head_weight().detach()[ids.to(dev)].float()
        else:
            lm_w = target.lm_head_weight().detach().float()

        def loss_fn(head, batch, rope, noise):
            return head_loss(head, batch, rope, lm_w, cfg, noise)
    loss_fn.vocab_size = lm_w.shape[0]
    return head, loss_fn


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

    head, loss_fn = _head_and_objective(target, train, data_dirs, cfg, None if resume else init)
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
            batch = split_batch(head, collate([train[i] for i in batches[batch_pos]], cfg.max_len, dev,
                                              cfg.loss_positions == "all"))
            batch_pos += 1
            if not bool(batch[4].any()):
                continue
            with _autocast(dev):
                loss, vloss, ploss, n, correct = loss_fn(head, batch, rope, noise=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_value_(head.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            run_loss, run_acc = _ema(run_loss, loss.item()), _ema(run_acc, int(correct) / max(1, n))
            bar.update(1)
            bar.set_postfix(loss=f"{run_loss:.3f}", **({} if vloss is None else {"v": f"{vloss.item():.3f}"}),
                            p=f"{ploss.item():.2f}", acc=f"{run_acc:.3f}", ep=epoch, lr=f"{sched.get_last_lr()[0]:.1e}")
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
        "ce_vocab_size": int(loss_fn.vocab_size), "config": asdict(cfg), "device": str(dev),
        "data": data_dirs, **({"init": str(init)} if init is not None else {}), **({"source": source} if source else {}),
    }
    save_draft(head.to(_DTYPES[cfg.save_dtype]), out_dir, extra={"training": summary})
    head.float()
    acc = "n/a" if summary["val_acc"] is None else f"{summary['val_acc']:.4f}"
    print(f"{out_dir}: head from step {summary['best_step']} (val top-1 acc {acc})")
    return summary

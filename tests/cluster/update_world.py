"""A tiny healthcare tree for the update-protocol tests, its registry, keys, and a coordinator.

    ut (tiny base) ── en ── en/medical ── radiology, cardiology, oncology (private: st-marys)
                        └── en/legal

Built once per session with the real builder over 60% of the demo corpora (the other 40% is
each node's "local data" for updates), then copied per test module. Helpers build packages
from adapters (honest or crafted) and fingerprint the stored state to prove a refused update
changed nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from cluster.updates.coordinator import Coordinator
from cluster.updates.keys import register_key
from cluster.updates.make import adapter_files, build_manifest
from cluster.updates.package import Package, write_package
from cluster.updates.policy import UpdatePolicy
from hierarchy.chain import LoraFactors
from hierarchy.spec import TrainSettings, load_spec
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.manifest import UpdateManifest, sign_manifest
from nodes.build.builder import build_tree
from nodes.build.finetune import fine_tune, lora_settings_of
from nodes.build.training import ChainPatch, tokenize_text
from nodes.store.adapters import AdapterWeights
from registry.db import Registry, init_registry, open_registry
from registry.updates import current_pins, list_updates, tree_versions
from tests.registry.helpers import snapshot as db_rows

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "demo" / "data"
TREE = "ut"
NODES = {
    "en": {"level": "language", "language": "en"},
    "en/medical": {"level": "domain", "domain": "medical", "tags": ["clinical"]},
    "en/legal": {"level": "domain", "domain": "legal"},
    "en/medical/radiology": {"level": "subdomain", "subdomain": "radiology"},
    "en/medical/cardiology": {"level": "subdomain", "subdomain": "cardiology"},
    "en/medical/oncology": {
        "level": "subdomain",
        "subdomain": "oncology",
        "visibility": "private",
        "owner": "st-marys",
        "description": "St Mary's private oncology node.",
    },
}
_BUILT: dict[str, Path] = {}
_LOCK = threading.Lock()


def built_tree(tmp_path_factory) -> Path:
    """The tiny tree, built once per session (about 5 s): its folder holds tree/, data/ and tree.yaml."""
    with _LOCK:
        if "tree" not in _BUILT:
            folder = tmp_path_factory.mktemp("update-tree")
            body = {
                "name": TREE,
                "base": {"model": "tiny", "hidden": 64, "layers": 2, "vocab": 400, "heads": 4, "kv_heads": 2},
                "defaults": {
                    "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj"]},
                    "training": {"steps": 30, "batch_size": 4, "max_seq_len": 32, "lr": 0.01, "seed": 0},
                },
                "nodes": {},
            }
            for path, extra in NODES.items():
                local = folder / "data" / path
                local.mkdir(parents=True, exist_ok=True)
                docs = (DATA / path / "train.txt").read_text().split("\n\n")
                cut = int(len(docs) * 0.6)
                (local / "train.txt").write_text("\n\n".join(docs[:cut]))
                (local / "local.txt").write_text("\n\n".join(docs[cut:]))
                body["nodes"][path] = {
                    "train": str(local / "train.txt"),
                    "eval": str(DATA / path / "eval.txt"),
                    **extra,
                }
            (folder / "tree.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
            report = build_tree(load_spec(folder / "tree.yaml"), folder / "tree")
            report.raise_for_failures()
            _BUILT["tree"] = folder
        return _BUILT["tree"]


@dataclass
class Keys:
    root: SigningKey
    operator: SigningKey
    evaluators: dict[str, SigningKey]  # node path -> its evaluator key
    nodes: dict[str, SigningKey]  # node path -> its node key
    spare: dict[str, SigningKey] = field(default_factory=dict)


@dataclass
class World:
    folder: Path  # this world's copy: tree/, registry.db
    tree: Path
    url: str
    registry: Registry
    coordinator: Coordinator
    keys: Keys
    data: Path  # local texts: data/<path>/local.txt

    def node_id(self, path: str) -> str:
        return f"{TREE}/{path}"

    def local(self, path: str) -> Path:
        return self.data / path / "local.txt"

    def reopen(self, policy: UpdatePolicy | None = None) -> Coordinator:
        self.coordinator = Coordinator.open(self.registry, self.tree, policy or self.coordinator.policy)
        return self.coordinator

    def close(self) -> None:
        self.registry.close()


def make_world(
    tmp: Path,
    built: Path,
    policy: UpdatePolicy | None = None,
    *,
    keys: bool = True,
    clock: Callable[[], float] | None = None,
) -> World:
    """A private copy of the built tree, a fresh registry with it imported, keys, a coordinator."""
    tree = tmp / "tree"
    shutil.copytree(built / "tree", tree)
    url = f"sqlite:///{tmp / 'registry.db'}"
    init_registry(url)
    registry = open_registry(url)
    coordinator = Coordinator.open(registry, tree, policy or UpdatePolicy(), **({"clock": clock} if clock else {}))
    root, operator = SigningKey.generate(), SigningKey.generate()
    k = Keys(
        root,
        operator,
        {p: SigningKey.generate() for p in ("en", "en/medical")},
        {p: SigningKey.generate() for p in NODES},
    )
    if keys:
        register_key(registry, root, "root")
        register_key(registry, operator, "operator", None, [root])
        for path, key in k.evaluators.items():
            register_key(registry, key, "evaluator", f"{TREE}/{path}", [root])
        for path, key in k.nodes.items():
            register_key(registry, key, "node", f"{TREE}/{path}", [root])
    return World(tmp, tree, url, registry, coordinator, k, built / "data")


# -- state fingerprints -------------------------------------------------------------------------
def tree_files(root: Path) -> dict[str, str]:
    """sha256 of every file under the tree dir (the lock file is empty and may be created)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def stored_state(world: World) -> tuple[dict[str, str], dict]:
    """Every file of the tree dir and every row of every registry table."""
    return tree_files(world.tree), db_rows(world.url)


def semantic_state(registry: Registry) -> dict:
    """What is served and recorded, without ids and times (to compare runs of the same operation)."""
    versions = tree_versions(registry, TREE)
    pins = current_pins(registry, TREE)
    return {
        "versions": {k: (v.latest, v.stable, dict(v.statuses)) for k, v in sorted(versions.items())},
        "pins": {
            k: ([(x["path"], x["version"], x["adapter"]) for x in v.chain], v.status) for k, v in sorted(pins.items())
        },
        "updates": sorted((u.kind, u.node_id, u.version, u.state) for u in list_updates(registry, tree=TREE)),
    }


# -- packages -----------------------------------------------------------------------------------
def served(world: World, path: str):
    """The served chain of a node: (ancestor adapters, own adapter, its ChainLink chain)."""
    view = world.coordinator._view()
    chain = view.pins[path].chain
    bench = world.coordinator.bench
    return bench.adapters(chain[:-1]), bench.adapter(chain[-1]), chain


def tokens(world: World, text_file: Path) -> torch.Tensor:
    return tokenize_text(world.coordinator.bench.evaluator.base.tokenizer, text_file.read_text())


def honest_adapter(
    world: World, path: str, *, steps: int = 20, lr: float = 3e-3, seed: int = 0, text: Path | None = None
) -> AdapterWeights:
    """What `update make` trains: the node's served adapter continued on its local text."""
    ancestors, current, _ = served(world, path)
    ev = world.coordinator.bench.evaluator
    with ev.lock:
        result = fine_tune(
            ev.base.model,
            ancestors,
            current,
            tokens(world, text or world.local(path)),
            TrainSettings(steps=steps, lr=lr, batch_size=4, max_seq_len=32, seed=seed),
        )
    return result.adapter


def crafted_adapter(
    world: World, path: str, loss: Callable, *, steps: int = 30, lr: float = 1e-2, seed: int = 0
) -> AdapterWeights:
    """The node's adapter trained on ``loss(model, windows) -> tensor`` (an attacker's objective)."""
    ancestors, current, _ = served(world, path)
    ev = world.coordinator.bench.evaluator
    model = ev.base.model
    with ev.lock, ChainPatch(model, ancestors, lora_settings_of(current), seed=seed) as patch:
        with torch.no_grad():
            for name, f in current.factors.items():
                patch.layers[name].lora_A.copy_(f.A)
                patch.layers[name].lora_B.copy_(f.B)
        params = patch.own_parameters()
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            value = loss(model, generator)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        model.eval()
        return patch.own_adapter()


def lm_loss(model, stream: torch.Tensor, generator: torch.Generator, rows: int = 4, length: int = 33):
    """Next-token cross-entropy on ``rows`` random windows of ``stream``."""
    starts = torch.randint(0, stream.numel() - length, (rows,), generator=generator)
    batch = torch.stack([stream[int(s) : int(s) + length] for s in starts])
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def combine(current: AdapterWeights, parts: list[tuple[float, AdapterWeights]]) -> AdapterWeights:
    """An exact adapter current + sum_i c_i (new_i - current), as stacked factors (scale 1)."""
    factors = {}
    for module, cur in current.factors.items():
        a, b = [cur.A], [cur.scale * cur.B * (1.0 - sum(c for c, _ in parts))]
        for c, adapter in parts:
            f = adapter.factors[module]
            a.append(f.A)
            b.append(c * f.scale * f.B)
        factors[module] = LoraFactors(A=torch.cat(a, 0), B=torch.cat(b, 1), scale=1.0)
    rank = factors[next(iter(factors))].rank
    return AdapterWeights(r=rank, alpha=float(rank), target_modules=current.target_modules, factors=factors)


def manifest_for(
    world: World, path: str, adapter: AdapterWeights, files: dict[str, bytes], **changes
) -> UpdateManifest:
    """The manifest an honest sender would sign for ``adapter``; ``changes`` override fields."""
    view = world.coordinator._view()
    parent = str(Path(path).parent) if "/" in path else ""
    fields = {
        "version": view.latest(path) + 1,
        "parent_version": (view.stable(parent) or 0) if parent else 0,
        "base_digest": world.coordinator.tree.base_digest,
        "now": datetime.now(UTC),
        "expires_in": timedelta(days=1),
    }
    fields.update(changes)
    return build_manifest(
        world.node_id(path),
        fields["parent_version"],
        fields["version"],
        fields["base_digest"],
        adapter,
        files,
        b"local data of " + path.encode(),
        {"eval_ppl": 10.0},
        now=fields["now"],
        expires_in=fields["expires_in"],
    )


def package_of(
    world: World,
    path: str,
    adapter: AdapterWeights,
    signers: list[SigningKey] | None = None,
    out: Path | None = None,
    **changes,
) -> tuple[Package, Path | None]:
    """A package for ``adapter`` signed by ``signers`` (default: the node's key); written when ``out``."""
    files = adapter_files(adapter)
    manifest = manifest_for(world, path, adapter, files, **changes)
    envelope = sign_manifest(manifest, signers if signers is not None else [world.keys.nodes[path]])
    if out is not None:
        write_package(out, envelope, files)
    return Package(envelope, files), out


def with_envelope(package: Package, envelope: Envelope) -> Package:
    return Package(envelope, dict(package.files))


def json_payload(envelope: Envelope) -> dict:
    return json.loads(envelope.payload)

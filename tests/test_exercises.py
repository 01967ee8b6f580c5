"""The notebooks' "implement it yourself" exercises: every folded solution is right.

A notebook exercise is a markdown cell with a folded ``<details><summary>Solution</summary>`` block
holding the solution as a python code fence, a code cell where the student writes the function (a
stub as committed: a docstring with a ``Shape:`` line and ``raise NotImplementedError``) and a
check cell that defines ``check_<name>(fn)``, compares the function with the package and says
"not written yet" while it raises NotImplementedError. Here each solution is executed (after the
notebook's imports) and every function it defines goes through the same comparison as the
notebook's check cell, found by the function's name in ``CHECKERS``: a new exercise without a
checker fails. The student's cell must stay a stub, so that the notebook does not show the
solution before it is unfolded; the check cells run as the notebook runs them, on the stub and
on the solution, and the notebooks' own ``check_*`` functions must tell the same right and
wrong versions apart as ``CHECKERS``.
"""

import ast
import functools
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from confeti import selftrain
from confeti.labels import IGNORE_INDEX
from confeti.prototypes import PrototypeMemory
from confeti.stylize import patch_nce_loss

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOLUTION = re.compile(r"<details>\s*<summary>\s*Solution\s*</summary>(.*?)</details>", re.S)
FENCE = re.compile(r"```python[ \t]*\n(.*?)```", re.S)


# ---- reading the notebooks ----------------------------------------------------------------


def _cells(path: Path, kind: str) -> list[str]:
    import nbformat

    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == kind]


def solutions(path: Path) -> list[str]:
    """The python code of each folded solution of a notebook, one string per <details> block."""
    found = []
    for md in _cells(path, "markdown"):
        for block in SOLUTION.findall(md):
            found.append("\n".join(FENCE.findall(block)))
    return found


def _parse(code: str) -> ast.Module:
    # a notebook cell may hold IPython magics or shell lines; they are not python
    lines = [ln for ln in code.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    return ast.parse("\n".join(lines))


def defined_functions(code: str) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in _parse(code).body if isinstance(n, ast.FunctionDef)}


def notebook_imports(path: Path) -> dict:
    """A namespace holding what the notebook's top-level import lines import."""
    nodes = [
        n
        for code in _cells(path, "code")
        for n in _parse(code).body
        if isinstance(n, (ast.Import, ast.ImportFrom))
    ]
    namespace: dict = {}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def is_stub(fn: ast.FunctionDef) -> bool:
    """A docstring with a ``Shape:`` line, then only ``raise NotImplementedError(...)``
    (comments aside)."""
    doc = ast.get_docstring(fn)
    if doc is None or "Shape:" not in doc or len(fn.body) != 2:
        return False
    stmt = fn.body[1]
    exc = stmt.exc if isinstance(stmt, ast.Raise) else None
    exc = exc.func if isinstance(exc, ast.Call) else exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def student_cell(path: Path, name: str) -> str:
    """The code cell where the student writes ``name``."""
    cells = [c for c in _cells(path, "code") if name in defined_functions(c)]
    assert len(cells) == 1, f"{path.name}: {len(cells)} code cells define {name}, not one"
    return cells[0]


def check_cell(path: Path, name: str) -> str:
    """The code cell that checks ``name``: it calls ``check_*(name)`` and catches
    NotImplementedError."""
    call = re.compile(r"\bcheck_\w+\(" + re.escape(name) + r"\)")
    cells = [c for c in _cells(path, "code") if call.search(c) and "NotImplementedError" in c]
    assert len(cells) == 1, f"{path.name}: {len(cells)} check cells for {name}, not one"
    return cells[0]


@functools.cache
def notebook_checkers() -> dict:
    """{name: function} of the ``check_*`` functions the notebooks' check cells define, each
    defined after its notebook's imports (the rest of the cell, which calls them, is not run)."""
    found = {}
    for path in NOTEBOOKS:
        for code in _cells(path, "code"):
            defs = [f for n, f in defined_functions(code).items() if n.startswith("check_")]
            if defs:
                namespace = notebook_imports(path)
                exec(compile(ast.Module(body=defs, type_ignores=[]), str(path), "exec"), namespace)
                found.update({f.name: namespace[f.name] for f in defs})
    return found


# ---- the checkers: the comparison of each notebook's check cell ---------------------------


def check_patch_nce(fn):
    """notebook 02: the loss and its gradient against stylize.patch_nce_loss; keys get none."""
    g_check = torch.Generator().manual_seed(1)
    n_img, n_patch, dim = 3, 32, 16
    k = F.normalize(torch.randn(n_img * n_patch, dim, generator=g_check), dim=1)
    q = F.normalize(k + 0.5 * torch.randn(n_img * n_patch, dim, generator=g_check), dim=1)
    q.requires_grad_(True)
    k.requires_grad_(True)  # a correct version sends no gradient into the keys
    for temp in (0.07, 0.5):
        mine, ref = fn(q, k, n_img, temp), patch_nce_loss(q, k, n_img, temp)
        grad_q, grad_k = torch.autograd.grad(mine, [q, k], allow_unused=True)
        (grad_ref,) = torch.autograd.grad(ref, [q])
        assert torch.allclose(mine, ref, atol=1e-5), "the losses differ"
        assert grad_q is not None, "no gradient reaches the queries"
        assert torch.allclose(grad_q, grad_ref, atol=1e-6), "the query gradients differ"
        assert grad_k is None or not grad_k.any(), "the keys must not receive gradient"


def check_ema_update(fn):
    """notebook 03: six CAM-weighted updates against PrototypeMemory.update (same class_sums)."""
    g_ex = torch.Generator().manual_seed(0)
    n_cls, dim = 5, 8
    ref = PrototypeMemory(n_cls, dim, momentum=0.6, top_k=8)
    mine_p, mine_n = torch.zeros(n_cls, dim), torch.zeros(n_cls, dtype=torch.long)
    for step in range(6):
        emb_b = torch.randn(2, dim, 4, 8, generator=g_ex)  # (B, D, h, w)
        lab_b = torch.randint(0, n_cls - 1, (2, 16, 32), generator=g_ex)  # class 4 never occurs
        if step == 2:
            lab_b[lab_b == 0] = IGNORE_INDEX  # class 0 is absent from this batch
        cam_b = torch.rand(2, n_cls, 4, 8, generator=g_ex)  # (B, C, h, w)
        sums, totals, _ = ref.class_sums(emb_b, lab_b, weights=cam_b)
        mine_p, mine_n = fn(mine_p, mine_n, sums, totals, ref.momentum)
        ref.update(emb_b, lab_b, weights=cam_b)
        assert torch.equal(mine_n, ref.counts), f"counts differ at update {step}"
        assert torch.allclose(mine_p, ref.protos, atol=1e-5), f"prototypes differ at update {step}"


def check_mix(fn):
    """notebook 04: images, integer labels and weight maps, equal to selftrain.mix (dtype too)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 2, (2, 4, 5), generator=g).float()  # (B, H, W)
    pairs = {
        "image": (torch.rand(2, 3, 4, 5, generator=g), torch.rand(2, 3, 4, 5, generator=g)),
        "label": (torch.randint(0, 19, (2, 4, 5), generator=g), torch.full((2, 4, 5), 255)),
        "weights": (torch.ones(2, 4, 5), torch.rand(2, 4, 5, generator=g)),
    }
    for name, (a, b) in pairs.items():
        mine, ref = fn(a, b, mask), selftrain.mix(a, b, mask)
        assert mine.dtype == ref.dtype and torch.equal(mine, ref), f"mix of {name}s differs"


def check_class_mix_masks(fn, draws=200):
    """notebook 04: per image ⌈n/2⌉ of its own classes (never 255), whole classes, all reachable.

    Random, so checked by its properties, as the notebook's check cell does.
    """
    num_classes = 7
    y = torch.full((4, 8, 16), IGNORE_INDEX)  # (B, H, W)
    y[0, 1:, :15] = torch.arange(15) // 3  # classes 0..4 and an ignored border
    y[1, :, :8] = 5  # one class
    y[2, :4], y[2, 4:] = 1, 6  # two classes
    # image 3: only ignored pixels, so nothing is pasted
    own = [{c for c in y[i].unique().tolist() if c != IGNORE_INDEX} for i in range(len(y))]
    seen = [set() for _ in y]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(draws):
            m = fn(y, num_classes=num_classes)
            assert m.shape == y.shape and m.is_floating_point()
            assert set(m.unique().tolist()) <= {0.0, 1.0}
            for i in range(len(y)):
                chosen = set(y[i][m[i] > 0].unique().tolist())
                assert chosen <= own[i], f"image {i}: pasted {chosen}, not all its own {own[i]}"
                assert len(chosen) == math.ceil(len(own[i]) / 2), f"image {i}: {len(chosen)} pasted"
                whole = torch.isin(y[i], torch.tensor(sorted(chosen), dtype=y.dtype))
                assert bool(m[i][whole].all()), "paste whole classes"
                seen[i] |= chosen
    assert seen == own, "some classes are never chosen"


CHECKERS = {
    "my_patch_nce": check_patch_nce,
    "my_ema_update": check_ema_update,
    "my_mix": check_mix,
    "my_class_mix_masks": check_class_mix_masks,
}

SOLUTIONS = [(path, k, code) for path in NOTEBOOKS for k, code in enumerate(solutions(path))]


def _id(case) -> str:
    path, k, _ = case
    return f"{path.stem}-solution{k + 1}"


# ---- the tests -----------------------------------------------------------------------------


def test_the_known_exercises_are_found():
    found = {}
    for path, _, code in SOLUTIONS:
        found.setdefault(path.stem, set()).update(defined_functions(code))
    assert found.get("02_pixel_alignment", set()) >= {"my_patch_nce"}, found
    assert found.get("03_feature_alignment", set()) >= {"my_ema_update"}, found
    assert found.get("04_joint_training", set()) >= {"my_mix", "my_class_mix_masks"}, found


@pytest.mark.parametrize("case", SOLUTIONS, ids=_id)
def test_folded_solution_matches_the_package(case):
    path, _, code = case
    names = list(defined_functions(code))
    assert names, f"{path.name}: a Solution block holds no python function (```python fence)"
    unchecked = [n for n in names if n not in CHECKERS]
    assert not unchecked, (
        f"{path.name}: no checker for {unchecked}: add one to CHECKERS in tests/test_exercises.py"
    )
    namespace = notebook_imports(path)
    exec(compile(code, f"{path.name} solution", "exec"), namespace)
    for name in names:
        CHECKERS[name](namespace[name])


@pytest.mark.parametrize("case", SOLUTIONS, ids=_id)
def test_exercise_cell_is_left_to_the_student(case):
    path, _, code = case
    for name in defined_functions(code):
        defs = [
            d for c in _cells(path, "code") for n, d in defined_functions(c).items() if n == name
        ]
        assert defs, f"{path.name}: no code cell where the student writes {name}"
        assert all(is_stub(d) for d in defs), (
            f"{path.name}: the student's {name} must be a stub (a docstring with a Shape: line, "
            "then raise NotImplementedError): keep the solution folded"
        )


@pytest.mark.parametrize("case", SOLUTIONS, ids=_id)
def test_check_cell_on_the_stub_and_on_the_solution(case, capsys):
    """The notebook's check cell, run as the notebook runs it: 'not written yet' for the stub,
    'correct' once the solution replaces it."""
    path, _, code = case
    for name in defined_functions(code):
        student, check = student_cell(path, name), check_cell(path, name)
        for body, said in ((student, f"{name} is not written yet"), (code, f"correct: {name}")):
            namespace = notebook_imports(path)
            exec(compile(body, f"{path.name} {name}", "exec"), namespace)
            exec(compile(check, f"{path.name} check cell", "exec"), namespace)
            assert said in capsys.readouterr().out, (
                f"{path.name}: the check cell did not say {said!r}"
            )


# ---- the checkers fail on a wrong version (and pass the same code done right) --------------


def _nce(feat_q, feat_k, batch_size, tau=0.07, detach=True, fill=True):
    d = feat_q.shape[1]
    q = feat_q.reshape(batch_size, -1, d)
    k = (feat_k.detach() if detach else feat_k).reshape(batch_size, -1, d)
    sim = q @ k.transpose(1, 2)  # (B, N, N)
    pos = sim.diagonal(dim1=1, dim2=2)[..., None]
    neg = sim.masked_fill(torch.eye(sim.shape[1], dtype=torch.bool), -10.0) if fill else sim
    return -torch.log_softmax(torch.cat([pos, neg], dim=2) / tau, dim=2)[..., 0].mean()


def _ema(protos, counts, sums, totals, momentum, ramp=True):
    seen = totals > 0
    mu = F.normalize(sums / totals.clamp_min(1e-12)[:, None], dim=1)
    m = (
        torch.clamp(1 - 1 / (counts.double() + 1), max=momentum)
        if ramp
        else torch.full_like(counts.double(), momentum)
    )
    m = m.to(protos.dtype)[:, None]
    new = F.normalize(m * protos + (1 - m) * mu, dim=1)
    return torch.where(seen[:, None], new, protos), counts + seen.long()


def _mix(a, b, mask, keep_int=True):
    if a.dim() == mask.dim() + 1:
        mask = mask.unsqueeze(1)
    if keep_int and not a.is_floating_point():
        return torch.where(mask.bool(), a, b)
    return a * mask + b * (1 - mask)


def _masks(labels, num_classes=19, per_image=True, share=0.5):
    out = torch.zeros(labels.shape)
    for i, y in enumerate(labels):
        present = (y if per_image else labels).unique()
        present = present[present < num_classes]
        n = math.ceil(len(present) * share)
        out[i] = torch.isin(y, present[torch.randperm(len(present))[:n]]).float()
    return out


P = functools.partial
VERSIONS = [  # (what, the checker's name, its keyword arguments, the version, right?)
    ("right PatchNCE", "check_patch_nce", {}, _nce, True),
    ("PatchNCE, self-pair not filled", "check_patch_nce", {}, P(_nce, fill=False), False),
    ("PatchNCE, keys not detached", "check_patch_nce", {}, P(_nce, detach=False), False),
    ("right EMA", "check_ema_update", {}, _ema, True),
    ("EMA without the momentum ramp", "check_ema_update", {}, P(_ema, ramp=False), False),
    ("right mix", "check_mix", {}, _mix, True),
    ("mix blending integer labels", "check_mix", {}, P(_mix, keep_int=False), False),
    ("right masks", "check_class_mix_masks", {"draws": 50}, _masks, True),
    (
        "masks from the whole batch",
        "check_class_mix_masks",
        {"draws": 50},
        P(_masks, per_image=False),
        False,
    ),
    ("masks of every class", "check_class_mix_masks", {"draws": 50}, P(_masks, share=1.0), False),
]
OURS = {f.__name__: f for f in CHECKERS.values()}


def test_every_checker_is_a_notebook_check_function():
    missing = sorted(set(OURS) - set(notebook_checkers()))
    assert not missing, f"no notebook check cell defines {missing}"


@pytest.mark.parametrize("where", ["tests", "notebook"])
@pytest.mark.parametrize(
    "checker, kwargs, fn, right", [v[1:] for v in VERSIONS], ids=[v[0] for v in VERSIONS]
)
def test_checker_tells_right_from_wrong(where, checker, kwargs, fn, right):
    check = P((OURS if where == "tests" else notebook_checkers())[checker], **kwargs)
    if right:
        check(fn)
    else:
        with pytest.raises(AssertionError):
            check(fn)

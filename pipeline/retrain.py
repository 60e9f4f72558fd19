"""The retrain stage: bottleneck features for a dataset, a classification head trained on them.

:func:`retrain` is the whole stage as a function (returns a :class:`RetrainResult`, whose
``save`` writes the stage's folder); :func:`train_head` trains a head on features alone. The head is a softmax layer, optionally preceded by one hidden ReLU layer with dropout. Options
mirror tensorflow-for-poets' retrain.py (steps or epochs, learning rate, batch sizes, evaluation
interval, TensorBoard summaries, checkpoints) plus label smoothing, class weights and early
stopping on validation loss. The same seed gives the same weights.

:func:`adopt` is the stage for a graph that already has its head (``--model-graph``): nothing is
trained, but the folder holds what the later stages read all the same (``split.json``,
``labels.txt`` with the graph's labels, ``metrics.json`` with an empty history), and the split's
test images are matched to the graph's labels, or verified unlabelled when they cannot be.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.config import AugmentConfig, BeamConfig, TrainConfig
from pipeline.console import log
from pipeline.console import progress as progress_bar
from pipeline.dataset import Dataset, Example, leakage_warnings, normalise_class_name
from pipeline.errors import DatasetError
from pipeline.head import Head, Patience, class_weight_vector, forward, loss
from pipeline.rundir import atomic_write_bytes, atomic_write_json, atomic_write_text
from pipeline.testhook import pause_point
from pipeline.types import BackboneSpec

MAX_WARNING_LINES = 20
FEW_IMAGES = 20  # per class: fewer training images rarely give a usable head


def train_head(
    x_train: np.ndarray, y_train: np.ndarray, num_classes: int, cfg: TrainConfig,
    x_val: np.ndarray | None = None, y_val: np.ndarray | None = None, progress: bool = True,
    summaries_dir: Path | None = None, checkpoint_dir: Path | None = None,
) -> Head:
    """Trains the head with Adam on minibatches.

    Args:
        summaries_dir: TensorBoard scalars (loss, accuracy per evaluation) are written here.
        checkpoint_dir: ``epoch_NNNN.npz`` every ``cfg.checkpoint_every`` epochs.

    Returns:
        The trained head with its history (``epoch``, train and validation loss/accuracy per
        evaluation, ``best_epoch``, ``stopped_early``).
    """
    import tensorflow as tf

    tf.random.set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dims = [x_train.shape[1], *([cfg.hidden_units] if cfg.hidden_units else []), num_classes]
    # Plain tf.Variables rather than Keras layers: they export to TFLite as constants, whereas
    # Keras-3 layers inside a tf.Module leave VAR_HANDLE ops that fail at run time.
    variables = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        variables.append(tf.Variable(rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32)))
        variables.append(tf.Variable(np.zeros(fan_out, np.float32)))
    opt = tf.keras.optimizers.Adam(cfg.learning_rate)
    weights = tf.constant(class_weight_vector(y_train, num_classes, cfg.class_weights))
    dropout_seed = tf.random.Generator.from_seed(cfg.seed)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = forward(variables, x, cfg.dropout, dropout_seed)
            value = loss(logits, y, num_classes, weights, cfg.label_smoothing, cfg.l2, variables)
        opt.apply_gradients(zip(tape.gradient(value, variables), variables))
        return value

    def snapshot() -> Head:
        vs = [v.numpy() for v in variables]
        return Head([(vs[i], vs[i + 1]) for i in range(0, len(vs), 2)])

    def evaluate(head: Head, x, y):
        losses, correct = [], 0
        for k in range(0, len(x), cfg.validation_batch_size):
            logits = head.logits(x[k:k + cfg.validation_batch_size])
            z = logits - logits.max(1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(1, keepdims=True))
            yy = y[k:k + cfg.validation_batch_size]
            losses.append(-logp[np.arange(len(yy)), yy])
            correct += int((logits.argmax(1) == yy).sum())
        return float(np.concatenate(losses).mean()), correct / max(len(y), 1)

    x_train = x_train.astype(np.float32)
    y_train = y_train.astype(np.int64)
    has_val = x_val is not None and len(x_val) > 0
    steps_per_epoch = max(1, -(-len(x_train) // cfg.batch_size))
    epochs = -(-cfg.steps // steps_per_epoch) if cfg.steps else cfg.epochs
    total_steps = cfg.steps or epochs * steps_per_epoch
    writer = tf.summary.create_file_writer(str(summaries_dir)) if summaries_dir else None
    history: dict = {"epoch": [], "train_loss": [], "train_accuracy": [], "val_loss": [], "val_accuracy": []}
    patience = Patience(cfg.early_stopping)
    done_steps = 0
    bar = progress_bar(total=epochs, desc="training", unit="epoch", disable=not progress)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_train))
        for k in range(0, len(order), cfg.batch_size):
            if done_steps >= total_steps:
                break
            idx = order[k:k + cfg.batch_size]
            step(x_train[idx], y_train[idx])
            done_steps += 1
        bar.update(1)
        if checkpoint_dir and cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0:
            buf = io.BytesIO()
            np.savez(buf, **snapshot().to_npz())
            atomic_write_bytes(Path(checkpoint_dir) / f"epoch_{epoch:04d}.npz", buf.getvalue())
        last = epoch == epochs
        if epoch % cfg.eval_every and not last:
            continue
        head = snapshot()
        tl, ta = evaluate(head, x_train, y_train)
        history["epoch"].append(epoch)
        history["train_loss"].append(tl)
        history["train_accuracy"].append(ta)
        if has_val:
            vl, va = evaluate(head, x_val, y_val)
            history["val_loss"].append(vl)
            history["val_accuracy"].append(va)
        if writer:
            with writer.as_default(step=epoch):
                tf.summary.scalar("loss/train", tl)
                tf.summary.scalar("accuracy/train", ta)
                if has_val:
                    tf.summary.scalar("loss/validation", vl)
                    tf.summary.scalar("accuracy/validation", va)
        if cfg.early_stopping and has_val and patience.update(vl, epoch, lambda: head):
            break
    bar.close()
    if writer:
        writer.close()
    final = patience.best if (cfg.early_stopping and has_val and patience.best is not None) else snapshot()
    final.history = {**history, "best_epoch": patience.epoch if cfg.early_stopping else epochs,
                     "stopped_early": patience.stopped, "steps": done_steps}
    return final


def evaluate_head(head: Head, x: np.ndarray, y: np.ndarray, num_classes: int) -> dict:
    """Metrics of the head on one split."""
    from pipeline.metrics import classification_metrics

    if not len(x):
        return classification_metrics(np.zeros(0, int), np.zeros(0, int), num_classes)
    return classification_metrics(y, head.logits(x).argmax(1), num_classes)


@dataclass
class RetrainResult:
    """What :func:`retrain` made.

    Attributes:
        dataset: the examples that could be read (unreadable ones are in ``skipped``).
        head: the trained head, with its history.
        metrics: ``train``/``validation``/``test`` metrics of the head on each split.
        skipped: unreadable image → reason.
        warnings: duplicate images across classes and splits (they make accuracy lie).
        misclassified: test images the head gets wrong (``path``, ``true``, ``predicted``).
        bottlenecks: ``computed``, ``cached`` and ``seconds`` of the feature extraction.
        augmented_training_examples: augmented copies added to the training set.
    """

    dataset: Dataset
    head: Head
    counts: dict
    metrics: dict[str, dict]
    skipped: dict[str, str]
    warnings: list[str]
    misclassified: list[dict]
    bottlenecks: dict
    augmented_training_examples: int
    fine_tune: dict | None = None
    tail: dict[str, np.ndarray] | None = None

    def save(self, folder: Path) -> dict[str, Path]:
        """Writes split.json, labels.txt, head.npz, metrics.json and the two pictures, and with
        fine-tuning tail.npz (the trained constants of the backbone, by node name); returns the
        files later stages read, by name."""
        from pipeline.report import plot_confusion_matrices, plot_training

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "split.json", self.dataset.to_dict())
        atomic_write_text(folder / "labels.txt", "\n".join(self.dataset.classes) + "\n")
        buf = io.BytesIO()
        np.savez(buf, **self.head.to_npz())
        atomic_write_bytes(folder / "head.npz", buf.getvalue())
        if self.tail is not None:
            buf = io.BytesIO()
            # Node names hold "/", which np.savez keeps as they are (the npz is a zip of names).
            np.savez(buf, **self.tail)
            atomic_write_bytes(folder / "tail.npz", buf.getvalue())
        else:
            (folder / "tail.npz").unlink(missing_ok=True)  # a fine-tuned run's, before this one
        atomic_write_json(folder / "metrics.json", {
            "counts": self.counts, "skipped": self.skipped, "warnings": self.warnings,
            "bottlenecks": self.bottlenecks, "history": self.head.history,
            "misclassified": self.misclassified,
            "augmented_training_examples": self.augmented_training_examples,
            **({"fine_tune": self.fine_tune} if self.fine_tune else {}), **self.metrics,
        })
        plot_training(folder / "training.png", self.head.history)
        plot_confusion_matrices(folder / "confusion_matrix.png",
                                [{"artifact": "head", "runtime": "test split", **self.metrics["test"]}],
                                list(self.dataset.classes))
        files = (("split", "split.json"), ("labels", "labels.txt"), ("head", "head.npz"), ("metrics", "metrics.json"))
        return {k: folder / f for k, f in files + ((("tail", "tail.npz"),) if self.tail is not None else ())}


def retrain(
    dataset: Dataset, graph_path: Path, spec: BackboneSpec, graph_sha256: str, cache_root: Path,
    train: TrainConfig = TrainConfig(), augment: AugmentConfig = AugmentConfig(), *,
    progress: bool = True, summaries_dir: Path | None = None, checkpoint_dir: Path | None = None,
    images_dir: Path | None = None, beam: BeamConfig | None = None, fine_tune_blocks: Sequence[str] = (),
    resume_path: Path | None = None,
) -> RetrainResult:
    """Extracts (or reads from the cache) every image's bottleneck and trains the head.

    Args:
        dataset: the split (:func:`pipeline.dataset.build_dataset`).
        graph_path: the frozen backbone; ``graph_sha256`` keys its cache entries.
        spec: the resolved backbone spec (fetch's).
        cache_root: the bottleneck cache folder (shared between runs).
        train, augment: the head's training knobs and the cached augmentation.
        summaries_dir: TensorBoard scalars go here; checkpoint_dir: ``epoch_NNNN.npz`` files.
        images_dir: the training folder, named in errors.
        beam: extract on Apache Beam with these runner settings (:func:`pipeline.beam.extract`:
            the same entries and features); None: this process.
        fine_tune_blocks: the catalog's blocks of this backbone, for ``train.fine_tune``
            (``pipeline/finetune.py``: the activations at the cut are cached instead of the
            bottlenecks, and the blocks after it train with the head).
        resume_path: where fine-tuning keeps its state after each epoch, and resumes from
            (:class:`pipeline.finetune.Progress`); None: not kept.

    Returns:
        The trained head, its metrics on every split and what was skipped on the way.

    Raises:
        DatasetError: a class is left without a readable training image.
        ConfigError: the fine-tuning cut is not in the graph or not before the bottleneck.
    """
    from pipeline.bottlenecks import extract

    counts = dataset.counts()
    for name, n in counts["train"].items():
        if n < FEW_IMAGES:
            log.warning(f"warning: class {name!r} has only {n} training images; {FEW_IMAGES} or more give a usable head")
    t0 = time.perf_counter()
    train_rows = [i for i, e in enumerate(dataset.examples) if e.split == "train"]
    paths = [e.path for e in dataset.examples]
    cut, graph_def, cached_spec = None, None, spec
    if train.fine_tunes:
        from pipeline.bottlenecks import variants
        from pipeline.finetune import resolve_cut
        from pipeline.graph import load_graph_def

        graph_def = load_graph_def(graph_path)
        cut = resolve_cut(graph_def, spec, fine_tune_blocks, train.fine_tune, train.fine_tune_from)
        cached_spec = cut.spec(spec)
        items = len(paths) + len(train_rows) * variants(augment)
        log.info(f"retrain: {cut.asked} trains the graph after {cut.tensor}; its activations "
                 f"({'x'.join(map(str, cut.shape))}, {cut.bytes_per_image / 1024:,.0f} KB an image) are cached for "
                 f"{items} images and copies ({items * cut.bytes_per_image / 1e9:.2f} GB) and streamed from the cache")
    if beam is not None:
        import pipeline.beam as beam_engine

        ext = beam_engine.extract(paths, graph_path, cached_spec, graph_sha256, cache_root, beam, augment=augment,
                                  augment_indices=train_rows, progress=progress, keep=cut is None)
    else:
        ext = extract(paths, graph_path, cached_spec, graph_sha256, cache_root, progress=progress, augment=augment,
                      augment_indices=train_rows, keep=cut is None)
    extract_s = time.perf_counter() - t0
    skipped = {dataset.examples[i].path: why for i, why in sorted(ext.skipped.items())}
    for path, why in skipped.items():
        log.info(f"skipped {path}: {why}")
    warnings = leakage_warnings(dataset, ext.hashes)
    for w in warnings[:MAX_WARNING_LINES]:
        log.warning(f"warning: {w}")
    if len(warnings) > MAX_WARNING_LINES:
        log.warning(f"warning: ... and {len(warnings) - MAX_WARNING_LINES} more duplicates (all in retrain/metrics.json)")
    ok = set(ext.ok)
    kept = [e for i, e in enumerate(dataset.examples) if i in ok]
    ds = Dataset(dataset.classes, tuple(kept))
    feats = ext.features
    y = np.array([e.label for e in kept], np.int64)
    split = np.array([e.split for e in kept])
    is_train = split == "train"
    missing = [name for k, name in enumerate(ds.classes) if not np.any(y[is_train] == k)]
    if missing:
        raise DatasetError(
            f"{images_dir or 'the images'}: no readable training images in class(es) {', '.join(map(repr, missing))} "
            f"({len(skipped)} image(s) skipped, listed above); add readable images or remove the folder"
        )
    pause_point("train")
    val = split == "validation"
    tuned = None
    if cut is not None:
        tuned, feats = _fine_tune(graph_def, spec, cut, ext, augment, y, is_train, val, len(ds.classes), train,
                                  progress, summaries_dir, checkpoint_dir, resume_path)
        head = tuned.head
        n_train = int(is_train.sum()) * (1 + (ext.augmented.shape[1] if ext.augmented is not None else 0))
    else:
        x_train, y_train = feats[is_train], y[is_train]
        if ext.augmented is not None:
            # Augmented copies join the training set only; validation and test stay untouched.
            extra = ext.augmented[is_train]
            x_train = np.concatenate([x_train, extra.reshape(-1, extra.shape[-1])])
            y_train = np.concatenate([y_train, np.repeat(y[is_train], extra.shape[1])])
        n_train = len(x_train)
        head = train_head(x_train, y_train, len(ds.classes), train, feats[val], y[val], progress=progress,
                          summaries_dir=summaries_dir, checkpoint_dir=checkpoint_dir)
    metrics = {s: evaluate_head(head, feats[split == s], y[split == s], len(ds.classes))
               for s in ("train", "validation", "test")}
    test_idx = np.nonzero(split == "test")[0]
    test_pred = head.logits(feats[test_idx]).argmax(1) if len(test_idx) else np.zeros(0, int)
    misclassified = [
        {"path": kept[i].path, "true": ds.classes[y[i]], "predicted": ds.classes[p]}
        for i, p in zip(test_idx, test_pred) if p != y[i]
    ]
    return RetrainResult(
        dataset=ds, head=head, counts=counts, metrics=metrics, skipped=skipped, warnings=warnings,
        misclassified=misclassified,
        bottlenecks={"computed": ext.computed, "cached": ext.cached, "seconds": round(extract_s, 2)},
        augmented_training_examples=int(n_train - is_train.sum()),
        fine_tune=None if tuned is None else {
            **cut.to_dict(), "trained_weights": tuned.tail.parameters, "tensors": len(tuned.tail.names),
            "epochs": train.fine_tune_epochs, "learning_rate": train.fine_tune_learning_rate,
            "head_only_validation": tuned.head_only, "seconds": round(tuned.seconds, 2)},
        tail=None if tuned is None else tuned.tail.values(),
    )


def _fine_tune(graph_def, spec: BackboneSpec, cut, ext, augment: AugmentConfig, y: np.ndarray, is_train: np.ndarray,
               val: np.ndarray, num_classes: int, train: TrainConfig, progress: bool, summaries_dir, checkpoint_dir,
               resume_path: Path | None = None):
    """Trains the blocks after ``cut`` with the head on the cached activations (``finetune.fine_tune``).

    Returns:
        The result and every kept example's features through the trained blocks, in ``ext.ok`` order.
    """
    from pipeline.bottlenecks import entry_name
    from pipeline.finetune import Tail, features_of, fine_tune

    plain = [entry_name(ext.hashes[i], 0, augment) for i in ext.ok]
    copies = ext.augmented.shape[1] if ext.augmented is not None else 0
    rows = np.nonzero(is_train)[0]
    # Augmented copies join the training set only; validation and test stay untouched.
    names = [plain[k] for k in rows] + [entry_name(ext.hashes[ext.ok[k]], v, augment)
                                        for k in rows for v in range(1, copies + 1)]
    labels = np.concatenate([y[rows], np.repeat(y[rows], copies)])

    def read(entries) -> np.ndarray:
        out = np.empty((len(entries), cut.values), np.float32)
        for k, name in enumerate(entries):
            got = ext.cache.get(name)
            if got is None:  # removed since the extraction wrote it
                raise DatasetError(f"{ext.cache.dir}: cached activations {name} vanished during training; run again")
            out[k] = got
        return out

    tail = Tail(graph_def, spec, cut)
    tuned = fine_tune(tail, read, (names, labels), ([plain[k] for k in np.nonzero(val)[0]], y[val]), num_classes,
                      train, train_head, progress=progress, summaries_dir=summaries_dir, checkpoint_dir=checkpoint_dir,
                      resume_path=resume_path)
    return tuned, features_of(tail, read, plain, progress, desc="fine-tuned features")


# --- adopting a graph that has its head -----------------------------------------------------------


def numbered_labels(classes: int) -> list[str]:
    """``"0"`` .. ``"C-1"``: the labels of an adopted graph given without ``--labels``."""
    return [str(k) for k in range(classes)]


def match_labels(folder_classes: tuple[str, ...], labels: list[str]) -> tuple[list[int] | None, list[str]]:
    """Each class folder's output index, when every folder names one of the graph's labels.

    Labels are compared as folder names are normalised (``dataset.normalise_class_name``: poets'
    ``retrained_labels.txt`` says ``black eyed susan`` for the folder ``Black_Eyed_Susan``).

    Returns:
        ``(indices, [])`` when every folder names a label (a subset of the labels will do), else
        ``(None, the folders that name none)``.
    """
    names: dict[str, list[int]] = {}
    for k, label in enumerate(labels):
        names.setdefault(normalise_class_name(label), []).append(k)
    index = {name: ks[0] for name, ks in names.items() if len(ks) == 1}  # two labels alike name neither
    unknown = [c for c in folder_classes if c not in index]
    return (None, unknown) if unknown else ([index[c] for c in folder_classes], [])


@dataclass
class AdoptResult:
    """What :func:`adopt` found.

    Attributes:
        dataset: the readable examples; in the labels' order when the folders name them (so a test
            image's label is the output it should win), else in the folders' own order.
        labels: the graph's output names, in output order.
        labels_source: the ``--labels`` file, or a note that they are numbered.
        unlabelled_reason: why the test images cannot be scored against the labels (verify then
            reports agreement and drift only), or None.
        counts, skipped: images per split and class (as found), unreadable image → reason.
    """

    dataset: Dataset
    labels: list[str]
    labels_source: str
    unlabelled_reason: str | None
    counts: dict
    skipped: dict[str, str]

    @property
    def labelled(self) -> bool:
        return self.unlabelled_reason is None

    def save(self, folder: Path) -> dict[str, Path]:
        """Writes split.json, labels.txt (the graph's labels) and metrics.json (an empty history);
        returns the files later stages read, by name."""
        import shutil

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # A head trained here before (the run directory held a retrained run) is not this model's.
        for stale in ("head.npz", "training.png", "confusion_matrix.png"):
            (folder / stale).unlink(missing_ok=True)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        atomic_write_json(folder / "split.json", self.dataset.to_dict())
        atomic_write_text(folder / "labels.txt", "\n".join(self.labels) + "\n")
        atomic_write_json(folder / "metrics.json", {
            "counts": self.counts, "skipped": self.skipped, "warnings": [], "bottlenecks": {}, "history": {},
            "misclassified": [], "augmented_training_examples": 0,
            "adopted": {"labels": self.labels, "labels_source": self.labels_source, "labelled": self.labelled,
                        "unlabelled_reason": self.unlabelled_reason},
        })
        return {k: folder / f for k, f in (("split", "split.json"), ("labels", "labels.txt"),
                                            ("metrics", "metrics.json"))}


def _unreadable(paths: list[str]) -> dict[int, str]:
    """Index → reason for the images that cannot be decoded (each is decoded once, on every core)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.images import ImageError, decode_rgb, read_image_file

    def problem(path: str) -> str | None:
        try:
            decode_rgb(read_image_file(path), path)
        except (ImageError, OSError) as err:
            return err.reason if isinstance(err, ImageError) else f"cannot read ({err.strerror or err})"
        return None

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        found = list(pool.map(problem, paths, chunksize=16))
    return {i: why for i, why in enumerate(found) if why}


def adopt(dataset: Dataset, labels: list[str], labels_source: str, *, images_dir: Path | None = None) -> AdoptResult:
    """The retrain stage for a graph that already has its head: no training.

    Every image is decoded once, so unreadable ones are dropped here as :func:`retrain` drops
    them (the calibration sample and the test split must be readable). The examples are then put
    in the labels' order when every class folder names a label.

    Args:
        dataset: the split (:func:`pipeline.dataset.build_dataset`), classes in folder order.
        labels: the graph's output names, in output order (``--labels``, or :func:`numbered_labels`).
        labels_source: where they came from, for the manifest and the messages.
        images_dir: the training folder, named in messages.

    Returns:
        The split, the labels, and why the test images are unlabelled, if they are.
    """
    counts = dataset.counts()
    skipped_at = _unreadable([e.path for e in dataset.examples])
    skipped = {dataset.examples[i].path: why for i, why in sorted(skipped_at.items())}
    for path, why in skipped.items():
        log.info(f"skipped {path}: {why}")
    kept = [e for i, e in enumerate(dataset.examples) if i not in skipped_at]
    indices, unknown = match_labels(dataset.classes, labels)
    if indices is None:
        shown = ", ".join(unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
        reason = (f"{len(unknown)} of the {len(dataset.classes)} class folders of {images_dir or 'the images'} "
                  f"({shown}) are not among the graph's {len(labels)} labels ({labels_source})")
        return AdoptResult(Dataset(dataset.classes, tuple(kept)), list(labels), labels_source, reason, counts, skipped)
    relabelled = tuple(Example(e.path, indices[e.label], e.split) for e in kept)
    return AdoptResult(Dataset(tuple(labels), relabelled), list(labels), labels_source, None, counts, skipped)

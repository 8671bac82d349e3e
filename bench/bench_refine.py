"""Refinement P1 -> P2 -> P3 on a crop of FIB-25 training_sample2 with the published checkpoint
(the crop is the canvas, as `exaconnect segment box` does): P1 the first FFN pass, P2 new
objects seeded in its unclaimed voxels (ffn/reseed.py), P3 agglomeration by FFN
resegmentation of neighbouring pairs (ffn/agglomerate.py), then the fill (ffn/fill.py: the
voxels still unclaimed handed to the objects around them, no network), after P3 and, for
comparison, straight after P1, there also with every object opened by 1 and 2 voxels (fixed
radii, not chosen: each trades VI for run length). The merge thresholds are chosen on the
crop's z < half (pairs whose decision point lies there, scored on those voxels), the fill's
smoothing on z < half of the filled P3 result; both are reported on z >= half and on the whole
crop. Scores: VI and adapted Rand error with label 0 one segment and no voxel left out,
expected run length on kimimaro skeletons of the crop's ground truth (scale 1.5, const 300,
dust 100). Cost: CPU-seconds and network evaluations.
Prints one JSON line.

    nice -n 5 .venv/bin/python bench/bench_refine.py [--bbox 64,64,64,160,160,160] [--cache DIR]

`--cache DIR` keeps each pass's result (and its measured cost) and reuses it on the next run,
so the threshold choice can be redone without the FFN; the JSON says which passes were reused.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_ffn_precision import CHECKPOINT, RESOLUTION, load_crop  # noqa: E402
from common import emit, require_fib25  # noqa: E402

FILL_SIGMAS = (0.0, 0.5, 1.0, 2.0)
OPEN_RADII = (1, 2)  # the fill straight after P1, then every object opened (ffn/fill.py open_objects)
GRID = {"min_iou": (0.0, 0.1, 0.3, 0.5, 0.7), "min_cross": (0.0, 0.1, 0.2, 0.4, 0.6), "min_self": (0.3, 0.6),
        "max_deleted": (0.02, 0.1, 1.0), "min_cross_one": (0.0, 0.4, 0.5, 0.6, 0.7, 0.8)}


def cached(cache: Path | None, name: str, compute, key: dict | None = None):
    """compute() -> (arrays dict, cost dict), or the stored result of an earlier run with the same
    `key` (the parameters the result depends on)."""
    if key:
        name = f"{name}-" + hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    if cache is not None and (cache / f"{name}.npz").exists():
        with np.load(cache / f"{name}.npz") as f:
            arrays = {k: f[k] for k in f.files}
        return arrays, {**json.loads((cache / f"{name}.json").read_text()), "reused": True}
    cpu, wall = time.process_time(), time.perf_counter()
    arrays, cost = compute()
    cost = {**cost, "cpu_s": round(time.process_time() - cpu, 1), "wall_s": round(time.perf_counter() - wall, 1)}
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache / f"{name}.npz", **arrays)
        (cache / f"{name}.json").write_text(json.dumps(cost))
    return arrays, {**cost, "reused": False}


def scores(segmentation, groundtruth, skeletons, offset_zyx=(0, 0, 0)) -> dict:
    from exaconnect.precomputed.evaluate import segmentation_metrics
    from exaconnect.precomputed.skeleton_metrics import skeleton_metrics

    voxels = segmentation_metrics(segmentation, groundtruth, ignore_groundtruth_zero=False)
    erl = skeleton_metrics(skeletons, segmentation, RESOLUTION, offset=tuple(reversed(offset_zyx)))
    return {"vi": round(voxels["vi"], 4), "vi_split": round(voxels["vi_split"], 4), "vi_merge": round(voxels["vi_merge"], 4),
            "adapted_rand_error": round(voxels["adapted_rand_error"], 4), "erl_nm": round(erl.erl, 1),
            "merging_segments": erl.merging_segments, "unsegmented_fraction": round(float((segmentation == 0).mean()), 4),
            "objects": int(len(np.unique(segmentation[segmentation != 0])))}


def merged_table(table, pairs: np.ndarray):
    """The contingency table of a segmentation after merging `pairs`, from the table before: the
    threshold grid scores hundreds of choices without relabelling the volume for each."""
    from exaconnect.precomputed.evaluate import Contingency
    from exaconnect.precomputed.stitching import apply_equivalence, equivalence_from_edges

    equivalence = equivalence_from_edges(pairs)
    segments = apply_equivalence(table.segment_ids, equivalence.ids, equivalence.roots)
    keys, inverse = np.unique(np.stack([segments, table.groundtruth_ids], axis=1), axis=0, return_inverse=True)
    return Contingency(keys[:, 0], keys[:, 1], np.bincount(inverse.ravel(), weights=table.counts).astype(np.int64))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bbox", default="64,64,64,160,160,160", help="crop of training_sample2, x0,y0,z0,x1,y1,z1")
    parser.add_argument("--cache", type=Path, default=None, help="keep and reuse each pass's result here")
    parser.add_argument("--min-contact", type=int, default=50, help="P3: contacts a pair needs to be resegmented")
    parser.add_argument("--min-seed-distance", type=float, default=2.0, help="P2: least distance of a seed from "
                        "claimed voxels and membranes (voxels)")
    parser.add_argument("--min-segment-size", type=int, default=300, help="P2: unclaimed voxels a new object must take")
    parser.add_argument("--batch-size", type=int, default=4, help="network calls batch this many P3 runs")
    args = parser.parse_args()
    require_fib25()
    from exaconnect.ffn.fill import fill_unsegmented, open_objects
    from exaconnect.ffn.agglomerate import (COLUMN, MergeThresholds, ResegmentOptions, accept, candidate_contacts,
                                            decision_boxes, resegment_pairs)
    from exaconnect.ffn.inference import segment_subvolume
    from exaconnect.ffn.predictor import load_model
    from exaconnect.ffn.reseed import ReseedOptions, grow_unclaimed, merge_new_objects
    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.evaluate import adapted_rand_error, contingency_table, variation_of_information
    from exaconnect.precomputed.skeleton_metrics import KimimaroParameters, skeletonize_labels
    from exaconnect.precomputed.stitching import apply_equivalence, equivalence_from_edges

    box = Box.parse(args.bbox)
    image, groundtruth = load_crop(box)
    predictor = load_model(str(CHECKPOINT), device="cpu")
    model, inference = predictor.model_config, predictor.config.inference
    half = image.shape[0] // 2

    def p1():
        result = segment_subvolume(image, predictor)
        return {"labels": result.labels}, {"network_evaluations": int(result.counters["network-evaluations"])}

    p1_key = {"bbox": args.bbox, "checkpoint": str(CHECKPOINT)}
    first, cost1 = cached(args.cache, "p1", p1, p1_key)
    labels1 = first["labels"].astype(np.uint64)
    reseed = ReseedOptions(min_seed_distance=args.min_seed_distance, min_segment_size=args.min_segment_size)

    def p2():
        result = grow_unclaimed(image, labels1, predictor, model, inference, reseed)
        return {"new": result.labels}, {"network_evaluations": int(result.counters["network-evaluations"]),
                                        "seeds": int(result.counters["p2-seeds"]),
                                        "objects_added": int(result.counters["p2-objects"])}

    p2_key = {"p1": p1_key, "reseed": reseed.__dict__}
    second, cost2 = cached(args.cache, "p2", p2, p2_key)
    labels2 = merge_new_objects(labels1, second["new"], int(labels1.max()) + 1)
    cost2["voxels_changed"] = int((labels2 != labels1).sum())
    options = ResegmentOptions(min_contact=args.min_contact)

    def p3():
        contacts = candidate_contacts(labels2, options)
        evidence = resegment_pairs(decision_boxes(image, labels2, contacts, options), predictor, model, inference,
                                   options, batch_size=args.batch_size)
        return ({"pairs": contacts.pairs, "points": contacts.points, "evidence": evidence},
                {"network_evaluations": int(np.nansum(evidence[:, COLUMN["evaluations"]])), "pairs": int(len(contacts))})

    third, cost3 = cached(args.cache, "p3", p3, {"p2": p2_key, "options": options.__dict__})
    pairs, points, evidence = third["pairs"], third["points"], third["evidence"]

    def agglomerated(thresholds, rows=None):
        merged = accept(evidence, thresholds) & (np.ones(len(pairs), bool) if rows is None else rows)
        equivalence = equivalence_from_edges(pairs[merged])
        return apply_equivalence(labels2, equivalence.ids, equivalence.roots), merged

    # Thresholds: those that score best on z < half, using only the pairs decided there.
    in_low = points[:, 0] < half if len(points) else np.zeros(0, bool)
    low_table = contingency_table(labels2[:half], groundtruth[:half], ignore_groundtruth_zero=False)
    choices = []
    for values in itertools.product(*GRID.values()):
        thresholds = MergeThresholds(**dict(zip(GRID, values)))
        table = merged_table(low_table, pairs[accept(evidence, thresholds) & in_low])
        choices.append((round(sum(variation_of_information(table)), 6), round(adapted_rand_error(table), 6), values,
                        thresholds))
    choices.sort(key=lambda c: (c[0], c[1], [-v for v in c[2]]))
    chosen = choices[0][3]
    labels3, merged = agglomerated(chosen)
    cost3.update({"pairs_merged": int(merged.sum()), "voxels_changed": int((labels3 != labels2).sum()),
                  "objects_merged": int(len(np.unique(labels2[labels2 != 0])) - len(np.unique(labels3[labels3 != 0])))})

    def filled(labels, sigma):
        cpu = time.process_time()
        out = fill_unsegmented(image, labels, sigma=sigma)
        return out, round(time.process_time() - cpu, 1)

    def low_vi(labels):
        table = contingency_table(labels[:half], groundtruth[:half], ignore_groundtruth_zero=False)
        return round(sum(variation_of_information(table)), 6), round(adapted_rand_error(table), 6)

    sigma = min(FILL_SIGMAS, key=lambda s: (low_vi(filled(labels3, s)[0]), s))
    labels4, fill_cpu = filled(labels3, sigma)
    labels1_filled, fill1_cpu = filled(labels1, sigma)
    cost_fill = {"network_evaluations": 0, "cpu_s": fill_cpu, "sigma": sigma,
                 "voxels_changed": int((labels4 != labels3).sum())}

    parameters = KimimaroParameters(scale=1.5, const=300, dust_threshold=100, anisotropy=RESOLUTION)
    skeletons = skeletonize_labels(groundtruth, parameters)
    table = {}
    rows = [("P1", labels1), ("P1+P2", labels2), ("P1+P2+P3", labels3), ("P1+P2+P3+fill", labels4),
            ("P1+fill", labels1_filled)]
    rows += [(f"P1+fill+open{radius}", open_objects(labels1_filled, radius)) for radius in OPEN_RADII]
    for name, labels in rows:
        table[name] = {"whole": scores(labels, groundtruth, skeletons),
                       "z_low_half": scores(labels[:half], groundtruth[:half], skeletons),
                       "z_high_half": scores(labels[half:], groundtruth[half:], skeletons, (half, 0, 0))}
    voxels = int(image.size)
    total_cpu = sum(c["cpu_s"] for c in (cost1, cost2, cost3))
    emit("refine", bbox=args.bbox, checkpoint=CHECKPOINT.name, half_z=half, kimimaro=parameters.to_dict(),
         scores=table, cost={"P1": cost1, "P2": cost2, "P3": cost3, "fill": cost_fill,
                             "fill_after_P1": {"network_evaluations": 0, "cpu_s": fill1_cpu}},
         cpu_s_per_megavoxel={"P1": round(cost1["cpu_s"] / voxels * 1e6, 1),
                              "P1+P2+P3": round(total_cpu / voxels * 1e6, 1),
                              "P1+P2+P3+fill": round((total_cpu + fill_cpu) / voxels * 1e6, 1)},
         thresholds=dict(zip(GRID, choices[0][2])), thresholds_chosen_on="z < half, pairs decided there",
         fill_sigma=sigma, fill_sigma_chosen_on="z < half of P1+P2+P3+fill", fill_sigmas=FILL_SIGMAS,
         reseed=reseed.__dict__, resegment={"radius": options.radius, "analysis_radius": options.analysis_radius,
                                            "max_contact_distance": options.max_contact_distance,
                                            "min_contact": options.min_contact})


if __name__ == "__main__":
    main()

"""Elastic alignment kernels, plain functions of numpy arrays (SOFIMA's shape): coarse
(whole-section shifts), flow (patch cross-correlation), match (a section against its
references), mesh (spring-mesh relaxation), warp (rendering), quality (reports), misalign
(known misalignments for tests and the demo). `services/align.py` wraps them as queue tasks."""

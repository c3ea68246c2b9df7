"""Analyses of the embedding space: QC outlier sweeps, cluster quality, labelled evaluation, export."""

"""Sampling, the continuous-batching engine, and the scoring / generation API over a loaded model.
"""

"""Benchmarks: each measures fastgpt against the baseline a user would otherwise
use, in the same run, and writes CSV rows plus a Markdown table of ratios."""

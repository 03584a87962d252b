"""Evaluation on the serving path: free-running behaviour scores, teacher-forced replay, timelines.

``evaluate`` streams held-out conversations through the sessions engine and
builds the report; ``scores`` defines every behaviour figure and its target from
per-micro-turn labels; ``replay`` feeds recorded conversations through the step
teacher-forced; ``timeline`` draws what happened per micro-turn. The job's
command line is ``python -m launch.evaluate``.
"""

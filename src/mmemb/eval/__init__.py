"""Ranking evaluation: encode each task's queries and unique candidates (cached), score, and report
Hit@1 / NDCG@5 per task and meta-task.
"""

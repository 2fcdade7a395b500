"""Flower settings for deployments: ``celery -A gathering_tasks flower --conf=config/flowerconfig.py``.

Credentials come from the environment (FLOWER_BASIC_AUTH=user:password), never from this file.
"""

import os

address = os.environ.get("FLOWER_ADDRESS", "127.0.0.1")
port = int(os.environ.get("FLOWER_PORT", "5555"))
basic_auth = [os.environ["FLOWER_BASIC_AUTH"]] if os.environ.get("FLOWER_BASIC_AUTH") else []
# Task arguments are run ids only, but keep Flower from rendering arguments anyway.
natural_time = True
persistent = False
max_tasks = 10000

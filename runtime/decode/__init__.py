"""The decode loop and what it drives: the head, the output grammar (C + Python), phrase constraints."""

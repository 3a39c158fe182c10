"""Fault-injection suite (issue 8): each test proves one guarantee of docs/reliability.md."""

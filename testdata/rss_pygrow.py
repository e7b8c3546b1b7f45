# rss_pygrow: a Python program that grows a known structure, for the RSS
# tier's tests: after a line on stdin it appends 1024 bytes objects of
# 64 KiB each (64 MiB, filled by bytes repetition), prints "ready" and waits
# for another line.
import sys

kept = []


def grow():
    for i in range(1024):
        kept.append(b"x" * (64 * 1024))


sys.stdin.readline()
grow()
print("ready", flush=True)
sys.stdin.readline()

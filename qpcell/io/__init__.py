"""Readers and writers at the edges of qpcell: files in, arrays out, and back."""

"""The retrieval methods: each builds its model on the frozen backbone and defines its losses."""

"""The retrieval methods: the registry (``registry``), what the training loop needs of a method (``base``), and one
package per method (``dm_adapter``, ``dasd``)."""

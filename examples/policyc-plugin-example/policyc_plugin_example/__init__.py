"""An example policyc plug-in (see README.md): its operators live in `policyc_plugin_example.operators`."""

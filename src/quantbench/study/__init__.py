"""The study: a sweep's runs read back, compared (stats), decided on (policy), reported, recommended and registered."""

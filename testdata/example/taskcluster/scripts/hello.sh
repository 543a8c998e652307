#!/bin/sh
# Prints the greeting baked into the image.
echo "${GREETING:-hello} from kiln"

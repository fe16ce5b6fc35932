"""Constants shared by several stages of the cycle."""

#: the pseudo-field of link-field writes in load results (the Marketo link fields, the Dataverse Marketo-id column)
LINK_FIELD = "(link)"

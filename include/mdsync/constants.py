"""Constants shared by several stages of the cycle."""

#: the pseudo-field of link-field writes in load results (the Marketo link fields, the Dataverse Marketo-id column)
LINK_FIELD = "(link)"
#: the pseudo-field of deleted-flag writes in load results (``marketo.deleted_flag_field``,
#: ``dynamics.deleted_flag_column``): the delete policy ``flag`` marking a deleted pair's survivor
DELETED_FLAG = "(deleted flag)"
#: the pseudo-field of deletes and deactivations (delete policy ``propagate``) in sync errors
DELETE_RECORD = "(delete)"
#: load-result pseudo-fields: not mapped fields, so no field map converts them and no write line describes them
PSEUDO_FIELDS = (LINK_FIELD, DELETED_FLAG, DELETE_RECORD)

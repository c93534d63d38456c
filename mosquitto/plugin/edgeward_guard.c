/*
 * edgeward_guard: a Mosquitto 2.0 plugin (API version 5) with two rules the ACL file
 * cannot express. Reviewed like the template: every rule says why it is there.
 *
 * 1. Retain only under one prefix (docs/protocol.md 2.4: retain is used on fleet topics
 *    only). A PUBLISH with the retain flag on any other topic is refused (MQTT v5 PUBACK
 *    135), and a retained message stored under any other topic (by an older broker, or
 *    restored from a persistence file) is never delivered. Option:
 *    plugin_opt_retain_prefix (required, e.g. "ew/v1/fleet/").
 * 2. No resumed session. A client that connects with clean start false (MQTT v5) or clean
 *    session false (3.1.1) may neither publish nor receive: nothing queued for an earlier
 *    connection under that client id is ever delivered (Mosquitto re-checks a resumed
 *    session's queue against the ACL and drops what is refused), so a revoked identity's
 *    session cannot hand anything to the next holder of its name. Edgeward's clients
 *    always start clean, except services (username svc.*), which resume their own short
 *    session after a reconnect with a reloaded certificate (docs/adr/0017). (So `check_retain_source` must stay off: 2.0.11 checks it with a
 *    zeroed pseudo-client, whose clean start is false.)
 *
 * Every other check is deferred (MOSQ_ERR_PLUGIN_DEFER) to the dynamic-security plugin and
 * the ACL file, which decide as before. The broker calls plugins' ACL callbacks in the
 * order of the `plugin` lines, then the ACL file; this plugin must come first.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

static mosquitto_plugin_id_t *plugin_id = NULL;
static char *retain_prefix = NULL;
static size_t retain_prefix_len = 0;

/* A service's name (svc.<name>[.<instance>]) is never bound to another party: the only
 * next holder of it is the same service with a renewed certificate, which resumes its
 * session on purpose to lose nothing across the reconnect (docs/adr/0017). */
static bool is_service(struct mosquitto *client)
{
    const char *username = mosquitto_client_username(client);
    return username != NULL && strncmp(username, "svc.", 4) == 0;
}

static int acl_check(int event, void *event_data, void *userdata)
{
    struct mosquitto_evt_acl_check *ed = event_data;
    (void)event;
    (void)userdata;

    if(ed->access != MOSQ_ACL_READ && ed->access != MOSQ_ACL_WRITE){
        return MOSQ_ERR_PLUGIN_DEFER; /* SUBSCRIBE / UNSUBSCRIBE: the ACL file's business */
    }
    if(!mosquitto_client_clean_session(ed->client) && !is_service(ed->client)){
        return MOSQ_ERR_ACL_DENIED;
    }
    if(ed->retain && (ed->topic == NULL
            || strncmp(ed->topic, retain_prefix, retain_prefix_len) != 0)){
        return MOSQ_ERR_ACL_DENIED;
    }
    return MOSQ_ERR_PLUGIN_DEFER;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
    for(int i = 0; i < supported_version_count; i++){
        if(supported_versions[i] == 5){
            return 5;
        }
    }
    return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
        struct mosquitto_opt *options, int option_count)
{
    (void)userdata;
    for(int i = 0; i < option_count; i++){
        if(strcmp(options[i].key, "retain_prefix") == 0 && options[i].value != NULL
                && options[i].value[0] != '\0'){
            retain_prefix = strdup(options[i].value);
        }
    }
    if(retain_prefix == NULL){
        mosquitto_log_printf(MOSQ_LOG_ERR,
                "Error: edgeward_guard needs plugin_opt_retain_prefix.");
        return MOSQ_ERR_INVAL;
    }
    retain_prefix_len = strlen(retain_prefix);
    plugin_id = identifier;
    mosquitto_log_printf(MOSQ_LOG_INFO, "edgeward_guard: retain only under %s, no resumed sessions.",
            retain_prefix);
    return mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
    (void)userdata;
    (void)options;
    (void)option_count;
    if(plugin_id != NULL){
        mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL);
    }
    free(retain_prefix);
    retain_prefix = NULL;
    return MOSQ_ERR_SUCCESS;
}

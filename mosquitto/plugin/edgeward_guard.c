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
 * 3. Cohort topics (docs/adr/0029): a topic under plugin_opt_cohort_prefix (e.g.
 *    "ew/v1/cohort/") is delivered only to the members of that topic's cohort; nobody else
 *    reads it, whatever they subscribed to (the ACL file grants no read there, so without
 *    this plugin nobody would). The model-distribution service publishes each model chunk
 *    once on its version's cohort topic and the broker copies it to the members. Members
 *    are kept here, in memory, and changed only by a plain-text PUBLISH on
 *    plugin_opt_cohort_control from a client whose username is plugin_opt_cohort_writer or
 *    one of its instances (<writer>.<instance>); the ACL file lets only that service write
 *    there, this is the second check. Payload: one line "<op> <cohort topic>", then one
 *    member username per line; op "+" adds them, "-" removes them, "=" replaces the set
 *    (with no names: the cohort is gone). A malformed update changes nothing. A broker
 *    restart forgets every cohort: the service names the member again before it serves
 *    chunks, so a member only waits for its next request. Bounds: COHORTS_MAX cohorts,
 *    MEMBERS_MAX members each, names of at most NAME_MAX bytes of [A-Za-z0-9_.-].
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
static char *cohort_prefix = NULL; /* NULL: no cohort topics (rule 3 off) */
static size_t cohort_prefix_len = 0;
static char *cohort_control = NULL;
static char *cohort_writer = NULL;
static size_t cohort_writer_len = 0;

#define COHORTS_MAX 4096
#define MEMBERS_MAX 100000
#define NAME_MAX_BYTES 128
#define TOPIC_MAX_BYTES 256

struct cohort {
    char *topic;
    char **members; /* sorted (strcmp), unique */
    size_t count;
    size_t capacity;
};

static struct cohort *cohorts = NULL; /* unsorted; few of them (one per version rolled out) */
static size_t cohort_count = 0;

/* A service's name (svc.<name>[.<instance>]) is never bound to another party: the only
 * next holder of it is the same service with a renewed certificate, which resumes its
 * session on purpose to lose nothing across the reconnect (docs/adr/0017). */
static bool is_service(struct mosquitto *client)
{
    const char *username = mosquitto_client_username(client);
    return username != NULL && strncmp(username, "svc.", 4) == 0;
}

static struct cohort *cohort_find(const char *topic)
{
    for(size_t i = 0; i < cohort_count; i++){
        if(strcmp(cohorts[i].topic, topic) == 0){
            return &cohorts[i];
        }
    }
    return NULL;
}

/* Index of name in c->members, or of where it would go (*found says which). */
static size_t member_slot(const struct cohort *c, const char *name, bool *found)
{
    size_t lo = 0, hi = c->count;
    while(lo < hi){
        size_t mid = lo + (hi - lo) / 2;
        int order = strcmp(c->members[mid], name);
        if(order == 0){
            *found = true;
            return mid;
        }
        if(order < 0){
            lo = mid + 1;
        }else{
            hi = mid;
        }
    }
    *found = false;
    return lo;
}

static bool is_member(const char *topic, const char *username)
{
    bool found = false;
    const struct cohort *c = username == NULL ? NULL : cohort_find(topic);
    if(c != NULL){
        (void)member_slot(c, username, &found);
    }
    return found;
}

static void cohort_clear(struct cohort *c)
{
    for(size_t i = 0; i < c->count; i++){
        free(c->members[i]);
    }
    c->count = 0;
}

static void cohort_drop(struct cohort *c)
{
    cohort_clear(c);
    free(c->members);
    free(c->topic);
    *c = cohorts[--cohort_count]; /* the last one takes its place */
}

static bool member_add(struct cohort *c, const char *name)
{
    bool found = false;
    size_t slot = member_slot(c, name, &found);
    if(found){
        return true;
    }
    if(c->count >= MEMBERS_MAX){
        return false;
    }
    if(c->count == c->capacity){
        size_t capacity = c->capacity == 0 ? 16 : c->capacity * 2;
        char **grown = realloc(c->members, capacity * sizeof(char *));
        if(grown == NULL){
            return false;
        }
        c->members = grown;
        c->capacity = capacity;
    }
    char *copy = strdup(name);
    if(copy == NULL){
        return false;
    }
    memmove(&c->members[slot + 1], &c->members[slot], (c->count - slot) * sizeof(char *));
    c->members[slot] = copy;
    c->count++;
    return true;
}

static void member_remove(struct cohort *c, const char *name)
{
    bool found = false;
    size_t slot = member_slot(c, name, &found);
    if(found){
        free(c->members[slot]);
        memmove(&c->members[slot], &c->members[slot + 1], (c->count - slot - 1) * sizeof(char *));
        c->count--;
    }
}

static bool name_ok(const char *name, size_t len)
{
    if(len == 0 || len > NAME_MAX_BYTES){
        return false;
    }
    for(size_t i = 0; i < len; i++){
        char ch = name[i];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9')
            || ch == '_' || ch == '.' || ch == '-';
        if(!ok){
            return false;
        }
    }
    return true;
}

static bool cohort_topic_ok(const char *topic, size_t len)
{
    if(len <= cohort_prefix_len || len > TOPIC_MAX_BYTES
            || strncmp(topic, cohort_prefix, cohort_prefix_len) != 0){
        return false;
    }
    for(size_t i = 0; i < len; i++){
        if(topic[i] == '+' || topic[i] == '#' || topic[i] == '\0'){
            return false;
        }
    }
    return true;
}

static bool is_writer(struct mosquitto *client)
{
    const char *username = mosquitto_client_username(client);
    return username != NULL && strncmp(username, cohort_writer, cohort_writer_len) == 0
        && (username[cohort_writer_len] == '\0' || username[cohort_writer_len] == '.');
}

/* Apply one membership update (the payload, not NUL-terminated). Checked whole first:
 * a malformed update changes nothing. */
static void cohort_update(const char *payload, size_t len)
{
    char topic[TOPIC_MAX_BYTES + 1];
    const char *end = payload + len;
    const char *eol = memchr(payload, '\n', len);
    const char *line_end = eol == NULL ? end : eol;
    size_t head = (size_t)(line_end - payload);
    if(head < 3 || payload[1] != ' ' || (payload[0] != '+' && payload[0] != '-' && payload[0] != '=')
            || !cohort_topic_ok(payload + 2, head - 2)){
        mosquitto_log_printf(MOSQ_LOG_WARNING, "edgeward_guard: malformed cohort update ignored.");
        return;
    }
    char op = payload[0];
    memcpy(topic, payload + 2, head - 2);
    topic[head - 2] = '\0';
    size_t names = 0;
    for(const char *at = eol == NULL ? end : eol + 1; at < end;){
        const char *next = memchr(at, '\n', (size_t)(end - at));
        const char *stop = next == NULL ? end : next;
        if(!name_ok(at, (size_t)(stop - at))){
            mosquitto_log_printf(MOSQ_LOG_WARNING, "edgeward_guard: cohort update for %s names"
                    " an invalid member; ignored.", topic);
            return;
        }
        names++;
        at = next == NULL ? end : next + 1;
    }
    if(names > MEMBERS_MAX){
        mosquitto_log_printf(MOSQ_LOG_WARNING, "edgeward_guard: cohort %s too large; ignored.", topic);
        return;
    }
    struct cohort *c = cohort_find(topic);
    if(c == NULL){
        if(op != '+' && op != '=' ){
            return; /* nothing to remove from */
        }
        if(names == 0){
            return;
        }
        if(cohort_count >= COHORTS_MAX){
            mosquitto_log_printf(MOSQ_LOG_WARNING, "edgeward_guard: too many cohorts; %s ignored.", topic);
            return;
        }
        struct cohort *grown = realloc(cohorts, (cohort_count + 1) * sizeof(struct cohort));
        char *copy = strdup(topic);
        if(grown == NULL || copy == NULL){
            free(copy);
            if(grown != NULL){
                cohorts = grown;
            }
            return;
        }
        cohorts = grown;
        c = &cohorts[cohort_count++];
        memset(c, 0, sizeof(*c));
        c->topic = copy;
    }
    if(op == '='){
        cohort_clear(c);
    }
    char name[NAME_MAX_BYTES + 1];
    for(const char *at = eol == NULL ? end : eol + 1; at < end;){
        const char *next = memchr(at, '\n', (size_t)(end - at));
        const char *stop = next == NULL ? end : next;
        memcpy(name, at, (size_t)(stop - at));
        name[stop - at] = '\0';
        if(op == '-'){
            member_remove(c, name);
        }else if(!member_add(c, name)){
            mosquitto_log_printf(MOSQ_LOG_WARNING, "edgeward_guard: cohort %s full; %s not added.",
                    topic, name);
        }
        at = next == NULL ? end : next + 1;
    }
    if(c->count == 0){
        cohort_drop(c);
    }
}

static int on_message(int event, void *event_data, void *userdata)
{
    struct mosquitto_evt_message *ed = event_data;
    (void)event;
    (void)userdata;
    if(ed->topic != NULL && strcmp(ed->topic, cohort_control) == 0 && is_writer(ed->client)){
        cohort_update(ed->payload, ed->payloadlen);
    }
    return MOSQ_ERR_SUCCESS;
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
    if(cohort_prefix != NULL && ed->access == MOSQ_ACL_READ && ed->topic != NULL
            && strncmp(ed->topic, cohort_prefix, cohort_prefix_len) == 0){
        return is_member(ed->topic, mosquitto_client_username(ed->client))
            ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
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
        if(options[i].value == NULL || options[i].value[0] == '\0'){
            continue;
        }
        if(strcmp(options[i].key, "retain_prefix") == 0){
            retain_prefix = strdup(options[i].value);
        }else if(strcmp(options[i].key, "cohort_prefix") == 0){
            cohort_prefix = strdup(options[i].value);
        }else if(strcmp(options[i].key, "cohort_control") == 0){
            cohort_control = strdup(options[i].value);
        }else if(strcmp(options[i].key, "cohort_writer") == 0){
            cohort_writer = strdup(options[i].value);
        }
    }
    if(retain_prefix == NULL){
        mosquitto_log_printf(MOSQ_LOG_ERR,
                "Error: edgeward_guard needs plugin_opt_retain_prefix.");
        return MOSQ_ERR_INVAL;
    }
    if((cohort_prefix == NULL) != (cohort_control == NULL)
            || (cohort_prefix == NULL) != (cohort_writer == NULL)){
        mosquitto_log_printf(MOSQ_LOG_ERR, "Error: edgeward_guard needs all three of"
                " plugin_opt_cohort_prefix, _control and _writer, or none.");
        return MOSQ_ERR_INVAL;
    }
    retain_prefix_len = strlen(retain_prefix);
    plugin_id = identifier;
    mosquitto_log_printf(MOSQ_LOG_INFO, "edgeward_guard: retain only under %s, no resumed sessions.",
            retain_prefix);
    if(cohort_prefix != NULL){
        cohort_prefix_len = strlen(cohort_prefix);
        cohort_writer_len = strlen(cohort_writer);
        mosquitto_log_printf(MOSQ_LOG_INFO, "edgeward_guard: %s* read by cohort members only,"
                " members set by %s on %s.", cohort_prefix, cohort_writer, cohort_control);
        int rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_MESSAGE, on_message, NULL, NULL);
        if(rc != MOSQ_ERR_SUCCESS){
            return rc;
        }
    }
    return mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
    (void)userdata;
    (void)options;
    (void)option_count;
    if(plugin_id != NULL){
        mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL);
        if(cohort_prefix != NULL){
            mosquitto_callback_unregister(plugin_id, MOSQ_EVT_MESSAGE, on_message, NULL);
        }
    }
    while(cohort_count > 0){
        cohort_drop(&cohorts[0]);
    }
    free(cohorts);
    cohorts = NULL;
    free(retain_prefix);
    free(cohort_prefix);
    free(cohort_control);
    free(cohort_writer);
    retain_prefix = cohort_prefix = cohort_control = cohort_writer = NULL;
    return MOSQ_ERR_SUCCESS;
}
